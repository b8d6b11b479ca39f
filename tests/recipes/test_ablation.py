"""Ablations (recipes/ablation.py): only new variants are trained, every row is measured in
one table, a base keeps its runs apart, and a later rung starts from the rung the ladder chose
(on the ladder in miniature: the `ladder` fixture, tests/conftest.py)."""

import dataclasses
import json
import shutil

from system15 import measure
from system15.config import load_ablation
from system15.recipes.ablation import run_ablation
from system15.rungs import weights_digest


def _replace(config, section: str, **changes):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


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
