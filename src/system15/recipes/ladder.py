"""The ladder: train every method of a recipe on one task and backbone, measure them in one
run, and write results/<name>/ (`system15 demo`, `system15 bench`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import write_text_atomic
from ..config import METHODS, RunConfig
from ..data import load_splits
from ..measure import average_worth, backbone_name, explain_latency, measure, sweep
from ..model import ReasoningModel
from ..report import device_name, plot_sweep, write_summary
from ..rungs import ladder_rung_and_choice, rule_run, training_record
from ..runtime import autocast


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
        models[method], choices[method] = ladder_rung_and_choice(config, method, splits, runs_dir)
        seconds[method] = round(time.perf_counter() - began, 1)
    with autocast(config):
        rows, records = measure(config, models, splits, runs_dir)
        for r in rows:
            r.update(training_record(runs_dir / r["method"]))
            if r["method"] in config.configs_tried:  # unset: not recorded, rather than a null in the table
                r["configs_tried"] = config.configs_tried[r["method"]]
        by_method, explained = {r["method"]: r for r in rows}, None
        if "system15" in models and "cot" in by_method:
            explained = explain_latency(models["system15"], splits["test"][0], by_method["system15"], by_method["cot"])
    summary = {
        "task": config.task.name,
        "backbone": backbone_name(config),
        "device": device_name(),
        "command": command,
        "rows": rows,
        "stage1_align": choices.get("latent"),
        "stage2_mu": choices.get("system15"),
        "stage1_average": (average_worth(config, "latent", runs_dir / rule_run(choices["latent"]["chosen"]), models["latent"], splits)
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
