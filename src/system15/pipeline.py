"""The ladder: train every method on one task and backbone, measure them in one run, report.

    cot, nocot  <- fresh backbone
    pause, coconut, latent  <- the CoT-SFT model
    system15  <- the stage-1 latent model (backbone and P frozen)

Each rung lives in runs/<name>/<method>/ and is skipped once finished, so an interrupted
ladder resumes where it stopped (and a rung interrupted mid-training resumes from its last
checkpoint). Timing of all methods happens in the same run, batch size by batch size.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_good, load_average, write_text_atomic
from .config import METHOD_ALIGN_RULES, METHODS, Ablation, RunConfig, load_config
from .data import DataError, Example, SyntheticTask, check_disjoint, file_splits, load_task
from .distributed import shard_map
from .evaluate import (Record, accuracy, accuracy_by_shape, evaluate, latency_breakdown, measure_latencies, record_of,
                       records_as_dicts, summarize)
from .inference import resolve_K, resolve_route
from .layout import cot_target, encode, prompt
from .model import ReasoningModel, build_model, load_reasoning_model
from .report import device_name, plot_sweep, write_summary
from .rungs import INIT_FROM, TEST_RECORDS, check_reusable, decoding_digest, provenance, weights_digest
from .runtime import accelerator_for, autocast, device_for, precision_for
from .train import objective_for
from .train.loop import LOG_FILE, fit, is_done, log_entries
from .train.stage1 import probe_readout


def load_splits(config: RunConfig) -> dict[str, list[Example]]:
    """The task's train, valid and test examples (capped by n_train, n_valid, n_test); a
    training question that reappears in valid or test is refused unless task.allow_overlap."""
    t = config.task
    caps = {"train": t.n_train, "valid": t.n_valid, "test": t.n_test}
    if t.name == "files":
        splits = file_splits(t.train, t.valid, t.test, holdout=t.holdout, seed=t.seed)
        splits = {name: examples[: caps[name]] for name, examples in splits.items()}
    else:
        synthetic = SyntheticTask(n_steps=t.n_steps, max_operand=t.max_operand, max_result=t.max_result,
                                  p_independent=t.p_independent)
        sizes = {"n_train": t.n_train or 20000, "n_valid": t.n_valid, "n_test": t.n_test or 500}
        common = dict(data_root=t.data_root, synthetic=synthetic, seed=t.seed, **sizes)
        splits = {name: load_task(t.name, name, n=caps[name], **common) for name in ("train", "valid", "test")}
    if not t.allow_overlap:
        check_disjoint(splits, {"train": t.train, "valid": t.valid, "test": t.test})
    return splits


def timed(model: ReasoningModel, K: int | None = None, lambda_depth: float | None = None) -> tuple:
    """A run for `measure_latencies`: the model with its own K and route unless given."""
    return model, resolve_K(model, K), resolve_route(model, lambda_depth, None, True)


def check_lengths(model: ReasoningModel, examples: list[Example], encoded) -> None:
    """Refuse training examples longer than the backbone's positions, naming the line."""
    limit = model.backbone.max_positions
    for example, e in zip(examples, encoded):
        length = len(prompt(model.tokenizer, e)) + len(cot_target(model.tokenizer, e))
        if length > limit:
            path, _, line = example.source.rpartition(":")
            raise DataError(path or example.source, int(line) if line.isdigit() else None, "question",
                            f"{length} tokens with its chain and answer; the backbone has {limit} positions")


def train_rung(config: RunConfig, method: str, splits, runs_dir: Path, run_name: str | None = None) -> ReasoningModel:
    """Train one method (or load it when its rung is already done); returns its best model.
    A finished or resumable run is only reused if it was trained on the same settings, from
    the same parent weights (`rungs.check_reusable`); otherwise StaleRunError says why."""
    run_dir = runs_dir / (run_name or method)
    objective = objective_for(method, config)
    done = is_done(run_dir)
    if done or latest_good(run_dir) is not None:
        check_reusable(run_dir, method, config.to_dict(), vars(config.stage(method)), runs_dir)
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
            provenance=provenance(method, runs_dir), run_config=config.to_dict())
    model = load_reasoning_model(run_dir / "best", config)
    return model.to(device_for(config))


def train_stage1(config: RunConfig, splits, runs_dir: Path) -> tuple[ReasoningModel, dict]:
    """Stage 1 with the configured alignment rule, and (compare_align) docs/design.md's rules too;
    the best on validation becomes runs/<name>/latent, every score is recorded."""
    rules = [config.latent.align] + ([r for r in METHOD_ALIGN_RULES if r != config.latent.align]
                                    if config.latent.compare_align else [])
    scores = _train_candidates(config, "latent", splits, runs_dir, "latent", "align", rules, _rule_run)
    chosen = max(scores, key=scores.get)
    return _keep(config, "latent", runs_dir, _rule_run(chosen)), {**scores, "chosen": chosen}


def train_stage2(config: RunConfig, splits, runs_dir: Path) -> tuple[ReasoningModel, dict | None]:
    """Stage 2 at `shortcut.mu`, or with `shortcut.mu_grid` at each weight of the grid (runs
    <name>/system15-mu_<weight>, the runs an ablation variant `mu <weight>` trains too); the
    largest weight whose best validation accuracy is within `shortcut.mu_tolerance` points of
    stage 1's becomes runs/<name>/system15 (`choose_mu`), every score is recorded."""
    grid = config.shortcut.mu_grid
    if not grid:
        return train_rung(config, "system15", splits, runs_dir), None
    scores = _train_candidates(config, "system15", splits, runs_dir, "shortcut", "mu", grid, _mu_run)
    stage1 = _best_score(runs_dir / "latent")
    chosen = choose_mu(scores, stage1, config.shortcut.mu_tolerance)
    model = _keep(config, "system15", runs_dir, _mu_run(chosen))
    return model, {"scores": {f"{mu:g}": acc for mu, acc in scores.items()}, "stage1": stage1,
                   "tolerance": config.shortcut.mu_tolerance, "chosen": chosen}


def _rule_run(rule: str) -> str:
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
    return _ladder_rung_and_choice(config, method, splits, runs_dir)[0]


def _ladder_rung_and_choice(config: RunConfig, method: str, splits, runs_dir: Path) -> tuple[ReasoningModel, dict | None]:
    """`ladder_rung`, with the record of the choice the rung made between runs (None: no choice)."""
    if method == "latent":
        return train_stage1(config, splits, runs_dir)
    if method == "system15":
        return train_stage2(config, splits, runs_dir)
    return train_rung(config, method, splits, runs_dir), None


def _best_score(run_dir: Path) -> float:
    return float(_training_record(run_dir)["best_valid_accuracy"])


def _training_record(run_dir: Path) -> dict:
    """A finished rung's own training (from its done.json), also when this run reused it,
    and its validation curve: [step, accuracy] at every evaluation (from its log)."""
    done = json.loads((run_dir / "done.json").read_text())
    entries = log_entries(run_dir / LOG_FILE)
    return {"best_valid_accuracy": done.get("best_valid_accuracy"), "train_steps": done["steps"],
            "train_seconds": done["seconds"],
            "valid_curve": [[e["step"], e["valid_accuracy"]] for e in entries if "valid_accuracy" in e]}


def evaluate_rung(config: RunConfig, method: str, model: ReasoningModel, test: list[Example],
                 run_dir: Path | None = None, label: str | None = None) -> list[Record]:
    """A rung's records on the test set. With `run_dir` (the rung's folder) they are kept in
    its test_records.json and reused while the same weights decode the same test set the same
    way with the same code (`rungs.decoding_digest`), so a ladder interrupted after this point
    does not decode the test set again. `label` names the rung on the progress bar."""
    K, route = model.spec.K, resolve_route(model, None, None, True)
    cache = None if run_dir is None else run_dir / TEST_RECORDS
    key = {"weights": weights_digest(run_dir / "best") if run_dir else None, "K": K, "route": dataclasses.asdict(route),
           "max_new_tokens": config.task.max_new_tokens, "batch_size": config.eval.batch_size,
           "device": device_for(config).type, "precision": precision_for(config), "code": decoding_digest(),
           "test": hashlib.sha256(json.dumps([[e.question, e.answer] for e in test]).encode()).hexdigest()}
    if cache is not None and cache.exists() and key["weights"]:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return [Record(**r) for r in saved["records"]]
        except (ValueError, TypeError, AttributeError):  # unreadable, or written by another version: decode again
            pass
    recs = evaluate(model, test, batch_size=config.eval.batch_size, desc=f"test {label or method}")
    if cache is not None and key["weights"]:
        write_text_atomic(cache, json.dumps({"key": key, "records": records_as_dicts(recs)}))
    return recs


def measure(config: RunConfig, models: dict[str, ReasoningModel], splits,
            runs_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Accuracy on the test set (reused per rung, see `evaluate_rung`), then latency of every
    method at every batch size; each batch size times at least one full batch."""
    test = splits["test"]
    rows, records = [], {}
    for method, model in models.items():
        recs = evaluate_rung(config, method, model, test, None if runs_dir is None else runs_dir / method)
        records[method] = records_as_dicts(recs)
        rows.append(_row(method, recs))
    runs = {method: timed(model) for method, model in models.items()}
    latency = {bs: measure_latencies(runs, test[: max(config.eval.timing_examples, bs)], batch_size=bs,
                                     max_new_tokens=config.task.max_new_tokens, rounds=config.eval.timing_rounds)
               for bs in tqdm(config.eval.timing_batch_sizes, desc="timing", leave=False)}
    by_method = {r["method"]: r for r in rows}
    for r in rows:
        m = r["method"]
        for bs in config.eval.timing_batch_sizes:
            ms, suffix = latency[bs], ("" if bs == 1 else f"_b{bs}")
            r[f"latency_ms{suffix}"] = ms[m]
            r[f"speedup_vs_cot{suffix}"] = ms["cot"] / ms[m] if "cot" in ms else float("nan")
            if "latent" in ms:
                r[f"speedup_vs_latent{suffix}"] = ms["latent"] / ms[m]
            if "nocot" in ms:  # the floor for any method that writes no reasoning
                r[f"latency_vs_nocot{suffix}"] = ms[m] / ms["nocot"]
    if "system15" in by_method and "latent" in by_method:
        s, l = by_method["system15"], by_method["latent"]
        s["flops_reduction_vs_latent"] = l["flops_per_step"] / s["flops_per_step"]
    return rows, records


def _row(method: str, records) -> dict:
    """A results row: the summary of a method's records; skip fractions only where layers can skip."""
    row = {"method": method, **summarize(records)}
    if method != "system15":
        for key in ("skip_frac_critical", "skip_frac_noncritical", "critical_layers_per_example"):
            row.pop(key)
    return row


def explain_latency(model: ReasoningModel, example: Example, row: dict, cot_row: dict) -> dict:
    """System-1.5's batch-1 latency rebuilt from its parts (evaluate.latency_breakdown) and the
    counts in its results row, next to the measured figure; and two upper bounds on its
    speedup over CoT for this model: with every skipped layer and every router free (the
    layers this run ran still run), and with every layer of every non-critical step free and
    every critical step's layers run (what the bars allow if critical steps keep their
    layers). The bounds set CoT, rebuilt from the same parts, against those floors, so both
    sides of each ratio are timed in the same moment of a noisy machine."""
    parts = latency_breakdown(model, example)
    layer, outside = parts["full_layer_us"], parts["step_outside_layers_us"]
    steps, run, critical = row["forwards_per_example"], row["layers_run_per_example"], row["critical_layers_per_example"]
    visited = steps * model.num_layers
    base_us = parts["prefill_us"] + steps * outside
    floor_us = base_us + run * layer
    skipped_us = (visited - run) * (parts["adapters_us"] + parts["kv_fill_us"]) + visited * parts["router_us"]
    cot_us = parts["prefill_us"] + cot_row["forwards_per_example"] * (outside + model.num_layers * layer)
    return {**{k: round(v, 1) for k, v in parts.items()}, "forwards_per_example": steps, "layers_run_per_example": run,
            "critical_layers_per_example": critical,
            "rebuilt_ms": (floor_us + skipped_us) / 1000, "measured_ms": row["latency_ms"],
            "cot_rebuilt_ms": cot_us / 1000, "speedup_vs_cot_if_skips_were_free": cot_us / floor_us,
            "speedup_vs_cot_if_only_critical_layers_ran": cot_us / (base_us + critical * layer)}


def sweep(config: RunConfig, model: ReasoningModel, cot: ReasoningModel | None, splits) -> list[dict]:
    """lambda_depth x K grid: accuracy on the test set (its first `eval.sweep_examples`, if set)
    and batch-1 speedup against CoT, every point and CoT timed in the same interleaved rounds."""
    test = splits["test"][: config.eval.sweep_examples or None]
    mnt = config.task.max_new_tokens
    points, runs = [], {}
    grid = [(d, k) for k in config.eval.sweep_step for d in config.eval.sweep_depth]
    for depth, K in tqdm(grid, desc="sweep", leave=False):
        answers = model.answer(test, K=K, lambda_depth=depth, batch_size=config.eval.batch_size)
        s = summarize([record_of(e, a) for e, a in zip(test, answers)])
        runs[(depth, K)] = timed(model, K, depth)
        points.append({"lambda_depth": depth, "K": K, "examples": len(test), "accuracy": s["accuracy"],
                       "flops_per_step": s["flops_per_step"],
                       "skip_frac_critical": s["skip_frac_critical"], "skip_frac_noncritical": s["skip_frac_noncritical"]})
    if cot is not None:
        runs["cot"] = timed(cot)
    ms = measure_latencies(runs, test[: config.eval.timing_examples], max_new_tokens=mnt, rounds=config.eval.timing_rounds)
    for point, key in zip(points, grid):
        point["latency_ms"] = ms[key]
        point["speedup_vs_cot"] = ms["cot"] / ms[key] if cot is not None else float("nan")
    return points


def run_ladder(config: RunConfig, *, runs_root: str | Path = "runs", results_root: str | Path = "results",
               command: str = "") -> dict:
    """Train and measure every configured method; write results/<name>/."""
    torch.manual_seed(0)
    runs_dir = Path(runs_root) / config.name
    out_dir = Path(results_root) / config.name
    splits = load_splits(config)
    methods = [m for m in METHODS if m in config.methods]
    models: dict[str, ReasoningModel] = {}
    choices, seconds = {}, {}
    for method in tqdm(methods, desc="ladder", leave=True):
        began = time.perf_counter()
        models[method], choices[method] = _ladder_rung_and_choice(config, method, splits, runs_dir)
        seconds[method] = round(time.perf_counter() - began, 1)
    with autocast(config):
        rows, records = measure(config, models, splits, runs_dir)
        for r in rows:
            r.update(_training_record(runs_dir / r["method"]))
        by_method, explained = {r["method"]: r for r in rows}, None
        if "system15" in models and "cot" in by_method:
            explained = explain_latency(models["system15"], splits["test"][0], by_method["system15"], by_method["cot"])
    summary = {
        "task": config.task.name,
        "backbone": _backbone_name(config),
        "device": device_name(),
        "command": command,
        "rows": rows,
        "stage1_align": choices.get("latent"),
        "stage2_mu": choices.get("system15"),
        "stage1_average": (average_worth(config, "latent", runs_dir / _rule_run(choices["latent"]["chosen"]), models["latent"], splits)
                           if "latent" in models else None),
        "system15_latency_parts": explained,
        "wall_seconds_this_run": seconds,
        "test_examples": len(splits["test"]),
        "timing_examples": min(len(splits["test"]), config.eval.timing_examples),
        "config": config.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if "system15" in models:
        with autocast(config):
            points = sweep(config, models["system15"], models.get("cot"), splits)
        summary["sweep"] = points
        refs = {r["method"]: r for r in rows if r["method"] in ("cot", "latent", "nocot")}
        summary["figures"] = [p.name for p in plot_sweep(out_dir, points, refs)]
    write_text_atomic(out_dir / "records.json", json.dumps(records))
    write_summary(out_dir, summary)
    return summary


def average_worth(config: RunConfig, method: str, run_dir: Path, model: ReasoningModel, splits) -> dict | None:
    """What `train.ema` bought a run, measured on the run itself: at its last checkpoint, the
    weight average against the weights training ended with (the same step, so the same
    trajectory), each decoded on validation and test as the rung is. None when the run keeps
    no average."""
    ckpt = latest_good(run_dir) if config.stage(method).ema else None
    if ckpt is None:
        return None
    from safetensors.torch import load_model

    own = copy.deepcopy(model)
    load_model(own, str(ckpt / "model.safetensors"))
    averaged = copy.deepcopy(own)
    unexpected = averaged.load_state_dict(load_average(ckpt), strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"{ckpt}: the average holds weights the model lacks: {unexpected[:3]}")
    out = {"ema": config.stage(method).ema, "step": int(ckpt.name.split("-")[-1])}
    for name, weights in (("own", own), ("average", averaged)):
        for split in ("valid", "test"):
            with autocast(config):
                out[f"{split}_{name}"] = accuracy(evaluate(weights, splits[split], batch_size=config.eval.batch_size))
    return out


def _backbone_name(config: RunConfig) -> str:
    b = config.backbone
    if b.source == "scratch":
        return f"{b.family} from scratch ({b.n_layer} layers, width {b.n_embd})"
    return b.path or b.source


def run_ablation(ablation: Ablation, *, runs_root: str | Path = "runs", results_root: str | Path = "results",
                 command: str = "") -> dict:
    """Retrain one rung once per variant, each from the recipe's own parent rung, and measure
    every variant and the reference rungs on the same test set in this run (batch-1 timing).

    Variant runs live in runs/<recipe name>/<method>-<variant>/, beside the ladder's own
    rungs, or with a `base` in runs/<recipe name>/<ablation name>/<method>-<variant>/ (its
    rows are not the ladder's), and are reused once done; each rung's test records are
    reused as the ladder reuses them (`evaluate_rung`)."""
    torch.manual_seed(0)
    recipe = load_config(ablation.recipe)
    runs_dir = Path(runs_root) / recipe.name
    splits = load_splits(recipe)
    test = splits["test"]
    timing_set = test[: recipe.eval.timing_examples]
    references = dict.fromkeys(m for m in ("cot", *ablation.reference) if m != ablation.method)
    folder = f"{ablation.name}/" if ablation.base else ""
    entries = [(m, m, recipe, None, ()) for m in references]
    entries += [(f"{ablation.method}: {v}", ablation.method, ablation.config(v), f"{folder}{ablation.method}-{_slug(v)}",
                 overrides) for v, overrides in ablation.variants.items()]
    parent, chain = INIT_FROM[ablation.method], []
    while parent is not None:
        chain.insert(0, parent)
        parent = INIT_FROM[parent]
    for method in chain:  # the parent rungs every variant starts from
        ladder_rung(recipe, method, splits, runs_dir)
    rows, runs = [], {}
    for label, method, cfg, run_name, overrides in tqdm(entries, desc="ablation", leave=True):
        run_dir = runs_dir / (run_name or method)
        if run_name:  # a variant
            model = train_rung(cfg, method, splits, runs_dir, run_name=run_name)
        else:  # a reference rung, as the ladder trained it
            model = ladder_rung(cfg, method, splits, runs_dir)
        with autocast(cfg):  # records kept in the rung's folder, as the ladder keeps them
            recs = evaluate_rung(cfg, method, model, test, run_dir, label=label)
        runs[label] = timed(model)
        K = model.spec.K
        rows.append({**_row(method, recs), "method": label, **_training_record(run_dir), "overrides": list(overrides)})
        shapes = accuracy_by_shape(recs, test)
        if shapes and method != "cot":
            rows[-1]["accuracy_by_shape"] = shapes
        worth = average_worth(cfg, method, run_dir, model, splits) if run_name else None
        if worth:
            rows[-1]["accuracy_without_average"] = worth["test_own"]
        if method == "latent" and cfg.latent.probe and K:  # what the probe branches were trained to say
            which = "first" if cfg.latent.probe_results == "all" else "last"  # live: the most recent first
            rows[-1]["probe_readout"] = probe_readout(model, [encode(model.tokenizer, e) for e in test], K, which)
    with autocast(recipe):  # batch-1 timing of every row, in interleaved rounds
        ms = measure_latencies(runs, timing_set, max_new_tokens=recipe.task.max_new_tokens, rounds=recipe.eval.timing_rounds)
    reference_ms = ms[rows[0]["method"]]  # CoT's, unless CoT itself is the ablated rung
    for r in rows:
        r["latency_ms"] = ms[r["method"]]
        r["speedup_vs_cot"] = reference_ms / r["latency_ms"]
    summary = {"task": recipe.task.name, "backbone": _backbone_name(recipe), "device": device_name(), "command": command,
               "ablation": str(ablation.path), "rows": rows, "test_examples": len(test),
               "timing_examples": len(timing_set), "config": recipe.to_dict()}
    write_summary(Path(results_root) / ablation.name, summary)
    return summary


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
