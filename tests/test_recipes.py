"""The whole ladder, in miniature: every rung trains, the table and figures are written."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from system15.checkpoint import write_atomic
from system15.config import METHODS, load_ablation
from system15.model import load_reasoning_model
from system15 import measure
from system15.data import load_splits
from system15.measure import TEST_RECORDS, evaluate_rung
from system15.recipes.ablation import run_ablation
from system15.recipes.ladder import run_ladder
from system15.rungs import StaleRunError, choose_mu, ladder_rung, train_rung, train_stage1, weights_digest

from conftest import tiny_config

TINY = {"task.n_train": 200, "task.n_valid": 8, "task.n_test": 12, "task.n_steps": 3, "task.max_new_tokens": 12,
        "eval.timing_examples": 4, "eval.timing_batch_sizes": "[1,4]", "eval.batch_size": 12,
        "eval.sweep_depth": "[0.5,0.9]", "eval.sweep_step": "[1,2]", "stage1.compare_align": "true",
        "baselines.coconut_stages": 2, "stage2.mu_grid": "[0.5,2]", **{f"stages.{m}": "{steps: 4, batch_size: 8, eval_every: 4, warmup: 1}" for m in METHODS}}


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    config = tiny_config(name="tiny", **TINY)
    summary = run_ladder(config, runs_root=root / "runs", results_root=root / "results", command="pytest")
    return root, config, summary


def test_summary_has_every_method_and_finite_numbers(ladder):
    root, _, summary = ladder
    on_disk = json.loads((root / "results" / "tiny" / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    assert {"task", "backbone", "device", "command", "rows"} <= set(on_disk)
    assert [r["method"] for r in on_disk["rows"]] == list(METHODS)
    for row in on_disk["rows"]:
        for key in ("accuracy", "decoding_steps", "flops_per_step", "latency_ms", "speedup_vs_cot"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert 0.0 <= row["accuracy"] <= 1.0
    s15 = next(r for r in on_disk["rows"] if r["method"] == "system15")
    for key in ("flops_reduction_vs_latent", "skip_frac_critical", "skip_frac_noncritical",
                "speedup_vs_cot_b4", "latency_vs_nocot"):
        assert math.isfinite(s15[key]), key
    assert set(on_disk["stage1_align"]) == {"segment", "codi", "chosen"}


def test_system15_latency_is_taken_apart(ladder):
    root, config, summary = ladder
    parts = summary["system15_latency_parts"]
    for key in ("prefill_us", "full_layer_us", "router_us", "adapters_us", "kv_fill_us", "step_outside_layers_us"):
        assert 0 < parts[key] < 1e6, key
    s15 = next(r for r in summary["rows"] if r["method"] == "system15")
    assert parts["forwards_per_example"] == s15["forwards_per_example"] >= config.architecture.K + 1
    assert 0 <= parts["layers_run_per_example"] <= parts["forwards_per_example"] * config.backbone.n_layer
    assert parts["rebuilt_ms"] > 0 and parts["measured_ms"] == s15["latency_ms"]
    assert parts["cot_rebuilt_ms"] * 1000 > parts["prefill_us"]  # CoT rebuilt from the same parts, chain included
    # the bound that keeps critical steps' layers: their count is the records', and with
    # fewer layers than every visited one it beats CoT rebuilt with every layer run
    critical = parts["critical_layers_per_example"]
    assert critical == s15["critical_layers_per_example"]
    assert 0 < critical < parts["forwards_per_example"] * config.backbone.n_layer
    floor_us = parts["prefill_us"] + parts["forwards_per_example"] * parts["step_outside_layers_us"] + critical * parts["full_layer_us"]
    assert parts["speedup_vs_cot_if_only_critical_layers_ran"] == pytest.approx(parts["cot_rebuilt_ms"] * 1000 / floor_us, rel=1e-3)  # parts are kept to 0.1 µs
    md = (root / "results" / "tiny" / "summary.md").read_text()
    assert "rebuilt from its parts" in md and "critical steps ran all of theirs" in md
    assert "Against the bars set for the default task" in md


def test_markdown_and_figures_are_written(ladder):
    root, _, summary = ladder
    out = root / "results" / "tiny"
    table = (out / "summary.md").read_text()
    assert "| system15 |" in table and "| cot |" in table
    for name in ("sweep_heatmap.png", "pareto.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["sweep"]) == 4


def test_decoding_steps_follow_the_method(ladder):
    _, config, summary = ladder
    rows = {r["method"]: r for r in summary["rows"]}
    K = config.architecture.K
    # thought methods decode their K thoughts plus at least one answer token; the budget caps the tokens
    budget = config.task.max_new_tokens
    for method, k in (("latent", K), ("system15", K), ("pause", config.baselines.pause_K), ("nocot", 0)):
        assert k + 1 <= rows[method]["decoding_steps"] <= k + budget, method
    assert 1 <= rows["cot"]["decoding_steps"] <= budget


def test_a_finished_rung_is_loaded_not_retrained(ladder):
    root, config, _ = ladder
    runs = root / "runs" / "tiny"
    stamps = {m: (runs / m / "done.json").stat().st_mtime_ns for m in ("cot", "system15")}
    splits = load_splits(config)
    for method in stamps:
        model = ladder_rung(config, method, splits, runs)
        assert model.method == method and (model.shortcuts is not None) == (method == "system15")
    assert stamps == {m: (runs / m / "done.json").stat().st_mtime_ns for m in stamps}


def test_test_records_are_reused_only_for_the_same_weights_set_and_decoding(ladder, monkeypatch):
    """A ladder stopped during timing or the sweep resumes without decoding the test set again."""
    root, config, summary = ladder
    runs, test = root / "runs" / "tiny", load_splits(config)["test"]
    decoded = []
    real = measure.evaluate
    monkeypatch.setattr(measure, "evaluate", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    by_method = {r["method"]: r for r in summary["rows"]}
    for method in ("cot", "system15"):
        model = ladder_rung(config, method, load_splits(config), runs)
        recs = evaluate_rung(config, method, model, test, runs / method)
        assert sum(r.correct for r in recs) / len(recs) == by_method[method]["accuracy"]
    assert decoded == []
    model = ladder_rung(config, "system15", load_splits(config), runs)
    model.spec.lambda_depth = 0.9
    evaluate_rung(config, "system15", model, test, runs / "system15")  # another threshold
    model.spec.lambda_depth = config.architecture.lambda_depth
    evaluate_rung(config, "system15", model, test[:5], runs / "system15")  # another test set
    (runs / "system15" / TEST_RECORDS).write_text('{"key": ')  # torn: decoded again, not an error
    evaluate_rung(config, "system15", model, test, runs / "system15")
    assert len(decoded) == 3
    evaluate_rung(config, "system15", model, test, runs / "system15")  # all the same: reused
    assert len(decoded) == 3
    monkeypatch.setattr(measure, "decoding_digest", lambda: "other code")  # the engine changed
    evaluate_rung(config, "system15", model, test, runs / "system15")
    assert len(decoded) == 4


def test_ablation_retrains_only_new_variants_and_measures_all_in_one_table(ladder, monkeypatch):
    root, config, _ = ladder
    recipe = root / "tiny.json"
    config.save(recipe)
    (root / "levers.yaml").write_text(
        "name: levers\nrecipe: tiny.json\nmethod: latent\nreference: [nocot]\n"
        "variants:\n  segment: []\n  K=1: [architecture.K=1]\n")
    runs = root / "runs" / "tiny"
    reused = (runs / "latent-segment" / "done.json").stat().st_mtime_ns
    summary = run_ablation(load_ablation(root / "levers.yaml"), runs_root=root / "runs", results_root=root / "results")
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["cot", "nocot", "latent: segment", "latent: K=1"]
    assert (runs / "latent-segment" / "done.json").stat().st_mtime_ns == reused  # same name as the ladder's rung
    assert (runs / "latent-K_1" / "done.json").is_file()
    assert rows["cot"]["speedup_vs_cot"] == 1.0
    assert rows["latent: K=1"]["overrides"] == ["architecture.K=1"]
    budget = config.task.max_new_tokens
    assert 2 <= rows["latent: K=1"]["decoding_steps"] <= 1 + budget
    assert rows["latent: segment"]["decoding_steps"] >= config.architecture.K + 1
    md = (root / "results" / "levers" / "summary.md").read_text()
    assert "`architecture.K=1`" in md and "best validation accuracy" in md
    curve = rows["latent: K=1"]["valid_curve"]  # every evaluation of its training, from its log
    logged = [json.loads(line) for line in (runs / "latent-K_1" / "log.jsonl").read_text().splitlines()]
    assert curve == [[e["step"], e["valid_accuracy"]] for e in logged if "valid_accuracy" in e] and curve
    assert max(acc for _, acc in curve) == rows["latent: K=1"]["best_valid_accuracy"]
    decoded = []  # measured again: every rung's test records are reused, only the timing runs
    real = measure.evaluate
    monkeypatch.setattr(measure, "evaluate", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    again = run_ablation(load_ablation(root / "levers.yaml"), runs_root=root / "runs", results_root=root / "results")
    assert decoded == [] and [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in summary["rows"]]


def test_an_ablation_with_a_base_keeps_its_rows_apart_from_the_ladder(ladder):
    """A base restates the recipe as the rows were trained: every variant starts from it,
    and its runs live in their own folder, so the ladder's rung of the same name is left alone."""
    root, config, _ = ladder
    config.save(root / "tiny.json")
    steps = config.stage("latent").steps
    (root / "based.yaml").write_text(
        "name: based\nrecipe: tiny.json\nmethod: latent\nreference: []\n"
        f"base: [stages.latent.steps={steps - 1}]\nvariants:\n  segment: []\n  lr: [stages.latent.lr=0.002]\n")
    runs = root / "runs" / "tiny"
    ladder_rung = (runs / "latent-segment" / "done.json").stat().st_mtime_ns
    summary = run_ablation(load_ablation(root / "based.yaml"), runs_root=root / "runs", results_root=root / "results")
    assert (runs / "latent-segment" / "done.json").stat().st_mtime_ns == ladder_rung
    for variant in ("segment", "lr"):
        done = json.loads((runs / "based" / f"latent-{variant}" / "done.json").read_text())
        assert done["steps"] == steps - 1
    trained = json.loads((runs / "based" / "latent-lr" / "run.json").read_text())["train"]
    assert trained["lr"] == 0.002 and trained["steps"] == steps - 1
    assert [r["overrides"] for r in summary["rows"][1:]] == [[], ["stages.latent.lr=0.002"]]


def test_an_ablation_starts_from_the_stage1_rule_the_ladder_chose(ladder, tmp_path):
    """The ladder's stage 1 keeps the best of its alignment rules, not always the recipe's own:
    an ablation of a later rung starts from (and measures) that chosen rung all the same."""
    root, config, summary = ladder
    shutil.copytree(root / "runs", tmp_path / "runs")
    other = next(r for r in ("segment", "codi") if r != summary["stage1_align"]["chosen"])
    _replace(config, "stage1", align=other).save(tmp_path / "tiny.json")
    (tmp_path / "mu.yaml").write_text("name: mu\nrecipe: tiny.json\nmethod: system15\nreference: [latent]\n"
                                      "variants:\n  mu 0.9: [stage2.mu=0.9]\n")
    runs = tmp_path / "runs" / "tiny"
    out = run_ablation(load_ablation(tmp_path / "mu.yaml"), runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    assert [r["method"] for r in out["rows"]] == ["cot", "latent", "system15: mu 0.9"]
    started = json.loads((runs / "system15-mu_0.9" / "run.json").read_text())["init_from"]
    assert started["run"] == "latent"
    assert started["weights_sha256"] == weights_digest(runs / "latent" / "best")


def _replace(config, section: str, **changes):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def test_a_run_trained_on_other_settings_is_refused_with_the_keys_named(ladder):
    root, config, _ = ladder
    runs = root / "runs" / "tiny"
    splits = load_splits(config)
    stamp = (runs / "pause" / "done.json").stat().st_mtime_ns
    train_rung(_replace(config, "stage2", mu=0.9), "pause", splits, runs)  # a key pause never reads
    assert (runs / "pause" / "done.json").stat().st_mtime_ns == stamp
    with pytest.raises(StaleRunError, match=r"baselines\.pause_K: trained with 2, asked for 3"):
        train_rung(_replace(config, "baselines", pause_K=3), "pause", splits, runs)
    with pytest.raises(StaleRunError, match=r"task\.n_steps: trained with 3, asked for 4"):
        train_rung(_replace(config, "task", n_steps=4), "cot", splits, runs)
    stages = {**config.stages, "system15": dataclasses.replace(config.stage("system15"), lr=0.5)}
    with pytest.raises(StaleRunError, match=r"stages\.system15\.lr: trained with 0\.001, asked for 0\.5"):
        train_rung(dataclasses.replace(config, stages=stages), "system15", splits, runs)
    assert (runs / "pause" / "done.json").stat().st_mtime_ns == stamp  # nothing was lost


def test_a_run_recorded_before_the_settings_were_regrouped_is_still_reused(ladder, tmp_path):
    """Run records written in the old layout (`latent.*`, `shortcut.*`) read as today's
    (config.RENAMED): the finished rung is reused, and a real difference is still named."""
    from system15.config import RENAMED

    root, config, _ = ladder
    runs = tmp_path / "tiny"
    shutil.copytree(root / "runs" / "tiny", runs)
    splits = load_splits(config)
    for method in ("pause", "latent-codi", "system15-mu_0.5"):
        record = json.loads((runs / method / "run.json").read_text())
        new = record["config"]
        for old, moved in RENAMED.items():
            home, key = moved.split(".")
            section, leaf = old.split(".")
            new.setdefault(section, {})[leaf] = new[home].pop(key)
        for home in {moved.split(".")[0] for moved in RENAMED.values()}:
            assert new.pop(home) == {}
        (runs / method / "run.json").write_text(json.dumps(record))
    stamps = {m: (runs / m / "done.json").stat().st_mtime_ns for m in ("pause", "latent-codi", "system15-mu_0.5")}
    train_rung(config, "pause", splits, runs)
    train_rung(_replace(config, "stage1", align="codi"), "latent", splits, runs, run_name="latent-codi")
    train_rung(_replace(config, "stage2", mu=0.5), "system15", splits, runs, run_name="system15-mu_0.5")
    assert {m: (runs / m / "done.json").stat().st_mtime_ns for m in stamps} == stamps
    with pytest.raises(StaleRunError, match=r"stage2\.mu: trained with 0\.5, asked for 0\.7"):
        train_rung(_replace(config, "stage2", mu=0.7), "system15", splits, runs, run_name="system15-mu_0.5")


def test_a_cap_that_did_not_bind_is_no_difference(ladder, tmp_path):
    root, config, _ = ladder
    runs = tmp_path / "tiny"
    shutil.copytree(root / "runs" / "tiny", runs)
    splits = load_splits(config)
    done = json.loads((runs / "cot" / "done.json").read_text())
    assert done["steps"] == config.stage("cot").steps  # the tiny CoT rung ran its whole schedule

    def capped(minutes):
        stages = {**config.stages, "cot": dataclasses.replace(config.stage("cot"), max_minutes=minutes)}
        return dataclasses.replace(config, stages=stages)

    stamp = (runs / "cot" / "done.json").stat().st_mtime_ns
    train_rung(capped(60.0), "cot", splits, runs)  # a cap it never reached: reused
    assert (runs / "cot" / "done.json").stat().st_mtime_ns == stamp
    with pytest.raises(StaleRunError, match=r"stages\.cot\.max_minutes: trained with None, asked for 1e-05"):
        train_rung(capped(1e-5), "cot", splits, runs)  # a cap shorter than the run took
    (runs / "cot" / "done.json").write_text(json.dumps({**done, "steps": done["steps"] - 1}))
    with pytest.raises(StaleRunError, match=r"stages\.cot\.max_minutes"):
        train_rung(capped(60.0), "cot", splits, runs)  # a run its cap stopped early


def test_a_run_whose_parent_was_retrained_is_refused(ladder, tmp_path):
    root, config, _ = ladder
    runs = tmp_path / "tiny"
    shutil.copytree(root / "runs" / "tiny", runs)
    splits = load_splits(config)
    train_rung(config, "pause", splits, runs)  # same parent weights: reused
    cot = load_reasoning_model(runs / "cot" / "best", config)
    with torch.no_grad():
        cot.backbone.lm.get_input_embeddings().weight.add_(0.01)
    write_atomic(runs / "cot" / "best", cot.save)  # as if the CoT rung had been trained again
    with pytest.raises(StaleRunError, match="the parent was retrained"):
        train_rung(config, "pause", splits, runs)


def test_the_latent_rung_follows_the_rule_chosen_on_validation(ladder, tmp_path):
    root, config, summary = ladder
    runs = tmp_path / "tiny"
    shutil.copytree(root / "runs" / "tiny", runs)
    chosen = summary["stage1_align"]["chosen"]
    other = next(r for r in ("segment", "codi") if r != chosen)
    shutil.rmtree(runs / "latent")
    shutil.copytree(runs / f"latent-{other}", runs / "latent", ignore=shutil.ignore_patterns("checkpoints"))
    train_stage1(config, load_splits(config), runs)
    assert weights_digest(runs / "latent" / "best") == weights_digest(runs / f"latent-{chosen}" / "best")


def test_stage2_keeps_the_largest_weight_of_its_grid_within_tolerance(ladder, tmp_path):
    """stage2.mu_grid: the ladder trains stage 2 at each weight and keeps the one
    `choose_mu` picks; an ablation variant at a grid weight is that same run, reused."""
    root, config, summary = ladder
    grid = summary["stage2_mu"]
    assert set(grid["scores"]) == {"0.5", "2"} and grid["chosen"] in (0.5, 2)
    assert grid["chosen"] == choose_mu({float(k): v for k, v in grid["scores"].items()}, grid["stage1"], grid["tolerance"])
    runs = root / "runs" / "tiny"
    assert weights_digest(runs / "system15" / "best") == weights_digest(runs / f"system15-mu_{grid['chosen']:g}" / "best")
    shutil.copytree(root / "runs", tmp_path / "runs")
    config.save(tmp_path / "tiny.json")
    (tmp_path / "mu.yaml").write_text("name: mu\nrecipe: tiny.json\nmethod: system15\nreference: [latent]\n"
                                      "variants:\n  mu 2: [stage2.mu=2]\n")
    done = tmp_path / "runs" / "tiny" / "system15-mu_2" / "done.json"
    before = done.read_text()
    out = run_ablation(load_ablation(tmp_path / "mu.yaml"), runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    assert done.read_text() == before  # reused, not retrained
    assert out["rows"][-1]["best_valid_accuracy"] == grid["scores"]["2"]


def test_choose_mu_takes_the_largest_weight_inside_the_band():
    scores = {0.8: 0.84, 3.2: 0.845, 6.4: 0.82, 12.8: 0.80}
    assert choose_mu(scores, 0.835, 1.0) == 3.2
    assert choose_mu(scores, 0.835, 2.0) == 6.4
    assert choose_mu(scores, 0.835, 4.0) == 12.8
    assert choose_mu(scores, 0.90, 1.0) == 3.2  # none inside: the most accurate
    assert choose_mu({1.0: 0.5, 2.0: 0.5}, 0.9, 1.0) == 1.0  # ...and of equals, the smaller


def test_the_sweep_can_decode_the_start_of_the_test_set_only(ladder, monkeypatch):
    """eval.sweep_examples: each sweep point decodes that many test examples (a GPU lease's
    minutes go to training instead); 0 keeps the whole test set."""
    root, config, _ = ladder
    splits = load_splits(config)
    model = load_reasoning_model(root / "runs" / "tiny" / "system15" / "best", config)
    seen = []
    decode = model.answer
    monkeypatch.setattr(model, "answer", lambda examples, **kw: seen.append(list(examples)) or decode(examples, **kw))
    for n, expected in ((5, splits["test"][:5]), (0, splits["test"])):
        seen.clear()
        cfg = dataclasses.replace(config, eval=dataclasses.replace(config.eval, sweep_examples=n))
        points = measure.sweep(cfg, model, None, splits)
        assert seen == [expected] * len(points) and {p["examples"] for p in points} == {len(expected)}
