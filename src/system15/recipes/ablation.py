"""An ablation: one rung retrained once per variant of an ablation file, every variant and
the reference rungs measured on the same test set in one run (`system15 ablate`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Ablation, load_config
from ..data import load_splits
from ..evaluate import accuracy_by_shape, measure_latencies
from ..layout import encode
from ..measure import average_worth, backbone_name, evaluate_rung, row_of, timed
from ..report import device_name, write_summary
from ..rungs import INIT_FROM, ladder_rung, train_rung, training_record
from ..runtime import autocast
from ..train.stage1 import probe_readout


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
        rows.append({**row_of(method, recs), "method": label, **training_record(run_dir), "overrides": list(overrides)})
        shapes = accuracy_by_shape(recs, test)
        if shapes and method != "cot":
            rows[-1]["accuracy_by_shape"] = shapes
        worth = average_worth(cfg, method, run_dir, model, splits) if run_name else None
        if worth:
            rows[-1]["accuracy_without_average"] = worth["test_own"]
        if method == "latent" and cfg.stage1.probe and K:  # what the probe branches were trained to say
            which = "first" if cfg.stage1.probe_results == "all" else "last"  # live: the most recent first
            rows[-1]["probe_readout"] = probe_readout(model, [encode(model.tokenizer, e) for e in test], K, which)
    with autocast(recipe):  # batch-1 timing of every row, in interleaved rounds
        ms = measure_latencies(runs, timing_set, max_new_tokens=recipe.task.max_new_tokens, rounds=recipe.eval.timing_rounds)
    reference_ms = ms[rows[0]["method"]]  # CoT's, unless CoT itself is the ablated rung
    for r in rows:
        r["latency_ms"] = ms[r["method"]]
        r["speedup_vs_cot"] = reference_ms / r["latency_ms"]
    summary = {"task": recipe.task.name, "backbone": backbone_name(recipe), "device": device_name(), "command": command,
               "ablation": str(ablation.path), "rows": rows, "test_examples": len(test),
               "timing_examples": len(timing_set), "config": recipe.to_dict()}
    write_summary(Path(results_root) / ablation.name, summary)
    return summary


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
