"""The rungs of the ladder and their run folders: which rung starts from which, training a
rung (or reusing it), and choosing between candidate runs of one rung.

    cot, nocot  <- fresh backbone
    pause, coconut, latent  <- the CoT-SFT model
    system15  <- the stage-1 latent model (backbone and P frozen)

Each rung lives in runs/<name>/<method>/ and is skipped once finished, so an interrupted
ladder resumes where it stopped (and a rung interrupted mid-training resumes from its last
checkpoint). A rung's training depends on
- the task and the backbone (every key but `task.n_test`, which only the test set reads);
- its own `stages.<method>` entry;
- the keys its objective lists in `Objective.settings` (pause reads `baselines.pause_K`, ...);
- the weights of the rung it starts from (`INIT_FROM`), recorded by their SHA-256.

`run.json` records the whole config, so the first three are read back from it. One key
is forgiven: a wall-clock cap (`max_minutes`) that did not bind. A finished run that made
every step of its schedule inside the new cap is the run that cap would give. Without this
check, a run folder left by an earlier config would be reused silently, and the results
table would mix runs trained on different settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from .checkpoint import MANIFEST, latest_good
from .config import METHOD_ALIGN_RULES, RunConfig, TrainConfig, merge, upgrade
from .data import DataError, Example
from .distributed import shard_map
from .evaluate import accuracy, evaluate
from .layout import cot_target, encode, prompt
from .model import WEIGHTS_FILE, ReasoningModel, build_model, load_reasoning_model
from .runtime import accelerator_for, autocast, device_for
from .train import objective_class, objective_for
from .train.loop import LOG_FILE, fit, is_done, log_entries

INIT_FROM = {"cot": None, "nocot": None, "pause": "cot", "coconut": "cot", "latent": "cot", "system15": "latent"}


class StaleRunError(RuntimeError):
    """A run folder holds a run trained with other settings than the ones asked for."""


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _lookup(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


# settings that are not part of any one run: the test set's size, and how the ladder chooses
# between stage-2 runs (each grid run is the run its own mu would give)
OUTSIDE_A_RUN = ("task.n_test", "stage2.mu_grid", "stage2.mu_tolerance")


def rung_settings(method: str, config: dict, train: dict) -> dict:
    """Every setting the training of `method` depends on, as {dotted key: value}.
    config: a RunConfig as a dict; train: its TrainConfig for `method` as a dict."""
    keys = ("task", "backbone", *objective_class(method).settings)
    out = {}
    for key in keys:
        out.update(_flatten(_lookup(config, key), key))
    for key in OUTSIDE_A_RUN:
        out.pop(key, None)
    out.update(_flatten(train, f"stages.{method}"))
    return out


def _cap_did_not_bind(run_dir: Path, steps: int, cap: float | None) -> bool:
    """A finished run that made every step of its schedule in less time than `cap` minutes
    is the run that cap would have given too: the wall-clock cap changed nothing."""
    try:
        done = json.loads((run_dir / "done.json").read_text())
        finished, seconds = done["steps"] == steps, float(done["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return finished and (cap is None or seconds < 60 * cap)


def weights_digest(model_dir: str | Path) -> str | None:
    """The SHA-256 of a saved model's weights, from its checkpoint manifest."""
    manifest = Path(model_dir) / MANIFEST
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get(WEIGHTS_FILE, {}).get("sha256")


def provenance(method: str, runs_dir: Path) -> dict:
    """What run.json records about where a new run starts: the parent rung and its weights."""
    parent = INIT_FROM[method]
    if parent is None:
        return {"init_from": None}
    return {"init_from": {"run": parent, "weights_sha256": weights_digest(runs_dir / parent / "best")}}


def check_reusable(run_dir: Path, method: str, config: dict, train: dict, runs_dir: Path) -> None:
    """Raise StaleRunError, naming every differing key, if the run recorded in
    `run_dir/run.json` was trained on other settings, or from other parent weights, than
    a run started now would be. Runs recorded before parents were fingerprinted skip the
    parent check."""
    record_path = run_dir / "run.json"
    try:
        record = json.loads(record_path.read_text())
        # on top of today's defaults: a key added since the run was recorded takes its
        # default, which is what the code did before the key existed
        recorded = rung_settings(method, merge(RunConfig().to_dict(), upgrade(record["config"])[0]),
                                 merge(dataclasses.asdict(TrainConfig()), record["train"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StaleRunError(f"{record_path}: cannot read the settings this run was trained with ({e!r}); "
                            f"move or delete {run_dir} to retrain it") from None
    wanted = rung_settings(method, config, train)
    differ = {k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)}
    cap = f"stages.{method}.max_minutes"
    if cap in differ and _cap_did_not_bind(run_dir, recorded[f"stages.{method}.steps"], wanted[cap]):
        differ.discard(cap)
    diffs = [f"{k}: trained with {recorded.get(k, '<unset>')!r}, asked for {wanted.get(k, '<unset>')!r}"
             for k in sorted(differ)]
    init = record.get("init_from")
    if init:
        now = weights_digest(runs_dir / init["run"] / "best")
        if now != init.get("weights_sha256"):
            diffs.append(f"started from {runs_dir / init['run'] / 'best'} with weights {str(init.get('weights_sha256'))[:12]}, "
                         f"which now holds {str(now)[:12]} (the parent was retrained)")
    if diffs:
        raise StaleRunError(f"{run_dir} holds a {method} run trained on other settings than asked for:\n  "
                            + "\n  ".join(diffs)
                            + f"\nMove or delete {run_dir} to retrain it, or give the new settings their own run "
                              "(an ablation variant, or another `name`).")


# -- training a rung, and choosing between candidate runs ---------------------------------

def check_lengths(model: ReasoningModel, examples: list[Example], encoded) -> None:
    """Refuse training examples longer than the backbone's positions, naming the line."""
    limit = model.backbone.max_positions
    for example, e in zip(examples, encoded):
        length = len(prompt(model.tokenizer, e)) + len(cot_target(model.tokenizer, e))
        if length > limit:
            raise DataError.at(example.source, "question",
                               f"{length} tokens with its chain and answer; the backbone has {limit} positions")


def train_rung(config: RunConfig, method: str, splits, runs_dir: Path, run_name: str | None = None) -> ReasoningModel:
    """Train one method (or load it when its rung is already done); returns its best model.
    A finished or resumable run is only reused if it was trained on the same settings, from
    the same parent weights (`rungs.check_reusable`); otherwise StaleRunError says why."""
    run_dir = runs_dir / (run_name or method)
    objective = objective_for(method, config)
    done = is_done(run_dir)
    if done or latest_good(run_dir) is not None:
        check_reusable(run_dir, method, config.to_dict(), dataclasses.asdict(config.stage(method)), runs_dir)
    if not done:
        parent = INIT_FROM[method]
        if parent is None:
            texts = [e.text for e in splits["train"]]
            model = build_model(config, texts)
        else:
            model = load_reasoning_model(runs_dir / parent / "best", config)
        model.to(device_for(config))
        valid = splits["valid"]

        def validate(m):  # every process scores its own shard; the records are gathered in order
            with autocast(config):  # K and route: the model's own, as the objective labelled it
                return accuracy(shard_map(lambda chunk: evaluate(m, chunk, batch_size=config.eval.batch_size), valid))

        encoded = [encode(model.tokenizer, e) for e in splits["train"]]
        check_lengths(model, splits["train"], encoded)
        fit(model, objective, encoded, config.stage(method), run_dir, validate, accelerator=accelerator_for(config),
            provenance=provenance(method, runs_dir), run_config=config.to_dict(), compile=config.compile)
    model = load_reasoning_model(run_dir / "best", config)
    return model.to(device_for(config))


def train_stage1(config: RunConfig, splits, runs_dir: Path) -> tuple[ReasoningModel, dict]:
    """Stage 1 with the configured alignment rule, and (compare_align) docs/design.md's rules too;
    the best on validation becomes runs/<name>/latent, every score is recorded."""
    rules = [config.stage1.align] + ([r for r in METHOD_ALIGN_RULES if r != config.stage1.align]
                                    if config.stage1.compare_align else [])
    scores = _train_candidates(config, "latent", splits, runs_dir, "stage1", "align", rules, rule_run)
    chosen = max(scores, key=scores.get)
    return _keep(config, "latent", runs_dir, rule_run(chosen)), {**scores, "chosen": chosen}


def train_stage2(config: RunConfig, splits, runs_dir: Path) -> tuple[ReasoningModel, dict | None]:
    """Stage 2 at `stage2.mu`, or with `stage2.mu_grid` at each weight of the grid (runs
    <name>/system15-mu_<weight>, the runs an ablation variant `mu <weight>` trains too); the
    largest weight whose best validation accuracy is within `stage2.mu_tolerance` points of
    stage 1's becomes runs/<name>/system15 (`choose_mu`), every score is recorded."""
    grid = config.stage2.mu_grid
    if not grid:
        return train_rung(config, "system15", splits, runs_dir), None
    scores = _train_candidates(config, "system15", splits, runs_dir, "stage2", "mu", grid, _mu_run)
    stage1 = _best_score(runs_dir / "latent")
    chosen = choose_mu(scores, stage1, config.stage2.mu_tolerance)
    model = _keep(config, "system15", runs_dir, _mu_run(chosen))
    return model, {"scores": {f"{mu:g}": acc for mu, acc in scores.items()}, "stage1": stage1,
                   "tolerance": config.stage2.mu_tolerance, "chosen": chosen}


def rule_run(rule: str) -> str:
    return f"latent-{rule}"


def _mu_run(mu: float) -> str:
    return f"system15-mu_{mu:g}"


def _train_candidates(config: RunConfig, method: str, splits, runs_dir: Path, section: str, key: str,
                      values, run_name) -> dict:
    """Train `method` once per value of the setting `<section>.<key>`, each into
    runs/<name>/<run_name(value)> (or load it, as `train_rung` does); value -> its best
    validation accuracy. Stage 1's rules and stage 2's weights are chosen among these."""
    scores = {}
    for value in values:
        cfg = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{key: value})})
        train_rung(cfg, method, splits, runs_dir, run_name=run_name(value))
        scores[value] = _best_score(runs_dir / run_name(value))
    return scores


def choose_mu(scores: dict[float, float], stage1: float, tolerance: float) -> float:
    """The largest compute weight whose validation accuracy (`scores`, mu -> accuracy) is at
    most `tolerance` points below stage 1's; when none is, the most accurate (ties: the smaller)."""
    kept = [mu for mu, acc in scores.items() if acc >= stage1 - tolerance / 100 - 1e-9]
    return max(kept) if kept else max(scores, key=lambda mu: (scores[mu], -mu))


def _keep(config: RunConfig, method: str, runs_dir: Path, chosen: str) -> ReasoningModel:
    """Make runs/<name>/<method> the chosen run (a copy without its checkpoints, unless it
    already holds the same weights), and load it."""
    target, chosen_dir = runs_dir / method, runs_dir / chosen
    if not is_done(target) or weights_digest(target / "best") != weights_digest(chosen_dir / "best"):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(chosen_dir, target, ignore=shutil.ignore_patterns("checkpoints"))
    return load_reasoning_model(target / "best", config).to(device_for(config))


def ladder_rung(config: RunConfig, method: str, splits, runs_dir: Path) -> ReasoningModel:
    """A rung as the ladder trains it: stage 1 keeps the best of its alignment rules, which
    need not be the rule the recipe names, and stage 2 the weight `choose_mu` picks."""
    return ladder_rung_and_choice(config, method, splits, runs_dir)[0]


def ladder_rung_and_choice(config: RunConfig, method: str, splits, runs_dir: Path) -> tuple[ReasoningModel, dict | None]:
    """`ladder_rung`, with the record of the choice the rung made between runs (None: no choice)."""
    if method == "latent":
        return train_stage1(config, splits, runs_dir)
    if method == "system15":
        return train_stage2(config, splits, runs_dir)
    return train_rung(config, method, splits, runs_dir), None


def _best_score(run_dir: Path) -> float:
    return float(training_record(run_dir)["best_valid_accuracy"])


def training_record(run_dir: Path) -> dict:
    """A finished rung's own training (from its done.json), also when this run reused it: its
    steps, seconds and examples (steps actually trained x the batch size run.json records),
    and its validation curve: [step, accuracy] at every evaluation (from its log)."""
    done = json.loads((run_dir / "done.json").read_text())
    entries = log_entries(run_dir / LOG_FILE)
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    batch = record.get("train", {}).get("batch_size")
    return {"best_valid_accuracy": done.get("best_valid_accuracy"), "train_steps": done["steps"],
            "train_seconds": done["seconds"], "train_examples": done["steps"] * batch if batch else None,
            "valid_curve": [[e["step"], e["valid_accuracy"]] for e in entries if "valid_accuracy" in e]}
