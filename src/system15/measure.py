"""Measuring trained rungs: their test records (decoded once, kept beside the weights), the
latency of every method in one run, the threshold sweep, System-1.5's latency taken apart,
and what the weight average bought.

Timing of all methods happens in the same run, batch size by batch size, interleaved
(`evaluate.measure_latencies`), so that a noisy machine touches every method alike.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import latest_good, load_average, write_text_atomic
from .config import RunConfig
from .data import Example
from .evaluate import Record, accuracy, evaluate, latency_breakdown, measure_latencies, records_as_dicts, summarize
from .inference import resolve_K, resolve_route
from .model import ReasoningModel
from .rungs import weights_digest
from .runtime import autocast, device_for, precision_for

TEST_RECORDS = "test_records.json"  # a finished rung's test-set records, kept by evaluate_rung
# The source that turns weights into test records: decoding, the layers, the shortcuts, the
# tokenizer, the layout of a prompt, and how an answer is read and scored.
DECODING_SOURCES = ("engine.py", "backbone.py", "shortcuts.py", "model.py", "tokenizer.py", "layout.py", "inference.py",
                    "evaluate.py", "flops.py", "data/formats.py", "data/records.py")


@cache
def decoding_digest() -> str:
    """SHA-256 over DECODING_SOURCES and the torch and transformers versions, so that test
    records decoded by other code (an engine change, a library upgrade) are decoded again
    instead of reused."""
    import torch
    import transformers

    package = Path(__file__).parent
    h = hashlib.sha256(f"torch {torch.__version__}\0transformers {transformers.__version__}\0".encode())
    for name in DECODING_SOURCES:
        h.update(name.encode() + b"\0" + (package / name).read_bytes())
    return h.hexdigest()


def timed(model: ReasoningModel, K: int | None = None, lambda_depth: float | None = None) -> tuple:
    """A run for `measure_latencies`: the model with its own K and route unless given."""
    return model, resolve_K(model, K), resolve_route(model, lambda_depth, None, True)


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
        rows.append(row_of(method, recs))
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


def row_of(method: str, records) -> dict:
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
        s = summarize(evaluate(model, test, K=K, lambda_depth=depth, batch_size=config.eval.batch_size))
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


def backbone_name(config: RunConfig) -> str:
    b = config.backbone
    if b.source == "scratch":
        return f"{b.family} from scratch ({b.n_layer} layers, width {b.n_embd})"
    return b.path or b.source
