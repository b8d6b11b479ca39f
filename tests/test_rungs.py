"""The rungs of the ladder (rungs.py): which settings a rung's training depends on, when a
run folder may be reused (`check_reusable` names every differing key), where a rung starts
from, and how stage 2's weight is chosen. The tests on the ladder in miniature train it once
(the `ladder` fixture, tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from system15.checkpoint import MANIFEST, write_atomic
from system15.config import load_ablation
from system15.data import DataError, load_splits
from system15.model import load_reasoning_model
from system15.recipes.ablation import run_ablation
from system15.rungs import (StaleRunError, check_lengths, check_reusable, choose_mu, ladder_rung, provenance, rung_settings,
                            train_rung, train_stage1, weights_digest)
from tests.helpers import encoded, tiny_config, tiny_model


def settings(method: str, config) -> dict:
    return rung_settings(method, config.to_dict(), dataclasses.asdict(config.stage(method)))


def _replace(config, section: str, **changes):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def restage(config, method: str, **changes):
    return dataclasses.replace(config, stages={**config.stages, method: dataclasses.replace(config.stage(method), **changes)})


def recorded_run(runs, method: str, config, init_from: dict | None = None, done: dict | None = None):
    """A run folder as `fit` leaves it: run.json with the config and the stage's settings."""
    run_dir = runs / method
    run_dir.mkdir(parents=True)
    record = {"config": config.to_dict(), "train": dataclasses.asdict(config.stage(method)), "init_from": init_from}
    (run_dir / "run.json").write_text(json.dumps(record))
    if done is not None:
        (run_dir / "done.json").write_text(json.dumps(done))
    return run_dir


def check(run_dir, method, config, runs):
    check_reusable(run_dir, method, config.to_dict(), dataclasses.asdict(config.stage(method)), runs)


def sealed_weights(folder, digest: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"model.safetensors": {"size": 1, "sha256": digest}}))
    return folder


def test_a_rung_depends_on_the_task_backbone_its_stage_and_its_objectives_keys():
    config = tiny_config()
    pause = settings("pause", config)
    assert {"task.name", "task.n_train", "backbone.n_layer", "baselines.pause_K", "stages.pause.lr"} <= pause.keys()
    assert "task.n_test" not in pause  # only the test set reads it
    assert not any(k.startswith(("stage1.", "stage2.", "stages.cot.")) for k in pause)
    assert pause["baselines.pause_K"] == config.baselines.pause_K and pause["stages.pause.lr"] == config.stage("pause").lr
    system15 = settings("system15", config)
    assert {"architecture.K", "architecture.kv_policy", "stage2.mu", "stages.system15.steps"} <= system15.keys()
    assert not {"stage2.mu_grid", "stage2.mu_tolerance"} & system15.keys()  # how the ladder chooses, not a run


def test_a_run_with_the_same_settings_is_reused_and_others_are_refused_naming_each_key(tmp_path):
    config = tiny_config()
    run_dir = recorded_run(tmp_path, "pause", config)
    check(run_dir, "pause", config, tmp_path)
    check(run_dir, "pause", _replace(config, "stage2", mu=0.9), tmp_path)  # a key pause never reads
    check(run_dir, "pause", _replace(config, "task", n_test=3), tmp_path)
    changed = restage(_replace(config, "baselines", pause_K=3), "pause", lr=0.5)
    with pytest.raises(StaleRunError) as err:
        check(run_dir, "pause", changed, tmp_path)
    message = str(err.value)
    assert f"{run_dir} holds a pause run trained on other settings" in message
    assert re.search(r"baselines\.pause_K: trained with 2, asked for 3\n  stages\.pause\.lr: trained with 0\.001, "
                     r"asked for 0\.5\n", message)


def test_an_unreadable_record_is_refused(tmp_path):
    config = tiny_config()
    run_dir = recorded_run(tmp_path, "cot", config)
    (run_dir / "run.json").write_text('{"config": ')
    with pytest.raises(StaleRunError, match=r"run.json: cannot read the settings this run was trained with"):
        check(run_dir, "cot", config, tmp_path)


@pytest.mark.parametrize("steps, seconds, reused", [(4, 30.0, True), (4, 7200.0, False), (3, 30.0, False)])
def test_a_wall_clock_cap_is_no_difference_where_it_did_not_bind(tmp_path, steps, seconds, reused):
    """The run was recorded without a cap and made `steps` of its 4 in `seconds`; asked again
    with a 60-minute cap, it is the run that cap would give only if it finished inside it."""
    config = restage(tiny_config(), "cot", steps=4)
    run_dir = recorded_run(tmp_path, "cot", config, done={"steps": steps, "seconds": seconds})
    capped = restage(config, "cot", max_minutes=60.0)
    if reused:
        check(run_dir, "cot", capped, tmp_path)
    else:
        with pytest.raises(StaleRunError, match=r"stages\.cot\.max_minutes: trained with None, asked for 60\.0"):
            check(run_dir, "cot", capped, tmp_path)


def test_a_run_whose_parent_weights_changed_is_refused(tmp_path):
    config = tiny_config()
    sealed_weights(tmp_path / "cot" / "best", "a" * 64)
    start = provenance("pause", tmp_path)
    assert start == {"init_from": {"run": "cot", "weights_sha256": "a" * 64}}
    run_dir = recorded_run(tmp_path, "pause", config, init_from=start["init_from"])
    check(run_dir, "pause", config, tmp_path)
    sealed_weights(tmp_path / "cot" / "best", "b" * 64)
    with pytest.raises(StaleRunError, match=r"weights aaaaaaaaaaaa, which now holds bbbbbbbbbbbb \(the parent was retrained\)"):
        check(run_dir, "pause", config, tmp_path)


def test_where_each_rung_starts_and_the_digest_of_its_weights(tmp_path):
    assert provenance("cot", tmp_path) == {"init_from": None}
    assert provenance("nocot", tmp_path) == {"init_from": None}
    assert weights_digest(tmp_path / "latent" / "best") is None  # no sealed folder: no digest
    sealed_weights(tmp_path / "latent" / "best", "c" * 64)
    assert weights_digest(tmp_path / "latent" / "best") == "c" * 64
    assert provenance("system15", tmp_path)["init_from"] == {"run": "latent", "weights_sha256": "c" * 64}


def test_a_training_example_longer_than_the_backbone_is_refused_by_its_line(examples):
    model = tiny_model(examples, **{"backbone.n_positions": 80})
    check_lengths(model, examples, encoded(model, examples))  # the synthetic chains fit
    long = dataclasses.replace(examples[0], question="a=1," * 20 + " a?", source="mine.jsonl:9")
    with pytest.raises(DataError, match=r"mine.jsonl:9: question: \d+ tokens with its chain and answer; "
                                        r"the backbone has 80 positions"):
        check_lengths(model, [examples[1], long], encoded(model, [examples[1], long]))


# -- on the ladder in miniature -------------------------------------------------------------

def test_a_finished_rung_is_loaded_not_retrained(ladder):
    root, config, _ = ladder
    runs = root / "runs" / "tiny"
    stamps = {m: (runs / m / "done.json").stat().st_mtime_ns for m in ("cot", "system15")}
    splits = load_splits(config)
    for method in stamps:
        model = ladder_rung(config, method, splits, runs)
        assert model.method == method and (model.shortcuts is not None) == (method == "system15")
    assert stamps == {m: (runs / m / "done.json").stat().st_mtime_ns for m in stamps}


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
            new.pop(home)  # what is left there was added since: an old record lacks it
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
