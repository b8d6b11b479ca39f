"""The GSM8K ladder in one GPU window: measure, plan, train, measure again, write as it goes.

    python recipes/gsm8k_gpu/run.py --out OUT [--budget 540] [key=value ...]

(run.sh calls it on the GPU machine). In order, each step writing OUT/summary.json,
OUT/summary.md and OUT/logs.tgz (every rung's run.json, done.json and log.jsonl, the probe,
the plans) again when it ends, so a run stopped anywhere returns what it had:
1. `probe.probe`: the costs of this machine, in its first seconds;
2. CoT-SFT, No-CoT, stage 1 and stage 2 (`rungs.ladder_rung`), each with the settings
   `plan.plan` gives it from the seconds then left; a rung that runs out of GPU memory is
   trained again at half its batch;
3. test decoding (1319 questions) and the batch-1/8/64 timing of those rungs
   (`measure.measure`), and our full path against HF `generate` at batch 1 (`speed.run_speed`);
4. pause tokens and Coconut, if `plan.extras_fit` says they fit, measured beside CoT.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

import plan as planner
import torch
from probe import probe

from system15.checkpoint import write_text_atomic
from system15.config import load_config
from system15.data import load_splits
from system15.measure import backbone_name, measure
from system15.report import device_name, markdown_table
from system15.rungs import ladder_rung, training_record
from system15.runtime import autocast, device_for, precision_for
from system15.speed import run_speed
from system15.train.loop import git_revision

RECIPE = "configs/gsm8k_gpu.yaml"
ROW_KEYS = ("method", "accuracy", "decoding_steps", "latency_ms", "speedup_vs_cot", "speedup_vs_cot_b8",
            "speedup_vs_cot_b64", "skip_frac_critical", "skip_frac_noncritical", "best_valid_accuracy", "train_steps",
            "train_seconds", "tokens_per_second", "mfu")


class Run:
    """The run's record: summary.json, summary.md and logs.tgz in `out`, rewritten by `save`."""

    def __init__(self, out: Path, runs: Path, summary: dict, started: float):
        self.out, self.runs, self.summary, self.started = out, runs, summary, started

    def left(self) -> float:
        return self.summary["budget_seconds"] - self.elapsed()

    def elapsed(self) -> float:
        return time.time() - self.started

    def phase(self, name: str, began: float) -> None:
        self.summary["phases"][name] = round(time.time() - began, 1)
        self.save()

    def save(self) -> None:
        self.summary["wall_seconds"] = round(self.elapsed(), 1)
        write_text_atomic(self.out / "summary.json", json.dumps(self.summary, indent=2, default=str) + "\n")
        write_text_atomic(self.out / "summary.md", markdown(self.summary))
        self.pack()

    def pack(self) -> None:
        """logs.tgz: what the run folder holds but checkpoints and weights."""
        files = [p for p in sorted(self.runs.rglob("*")) if p.is_file() and "checkpoints" not in p.parts
                 and p.parent.name != "best" and p.suffix in (".json", ".jsonl", ".log", ".txt")
                 and p.name != "test_records.json"]
        tmp = self.out / ".logs.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(self.runs.parent)))
        tmp.replace(self.out / "logs.tgz")


def markdown(s: dict) -> str:
    lines = [f"# GSM8K with SmolLM2-135M in one GPU window ({s['status']})", "",
             f"device: {s['device']} · commit: `{s['commit']}` · precision: {s.get('precision')} · "
             f"budget {s['budget_seconds']} s, used {s.get('wall_seconds')} s", ""]
    if s.get("rows"):
        lines += [markdown_table(s["rows"], ROW_KEYS), ""]
    hf = s.get("hf_generate")
    if hf:
        lines += [f"Decoding at batch 1, same model and tokens: our full path {hf['full_step_ms']:.2f} ms a step, "
                  f"HF `generate` {hf['hf_step_ms']:.2f} ms (ours is {hf['ratio']:.2f}x HF's speed; greedy tokens "
                  f"agree on {hf['agreement']:.0%} of steps).", ""]
    if s.get("training"):
        lines += ["| rung | batch | steps | seconds (its clock: the last validation left out) | tokens/s | MFU | compiled |",
                  "|---|---|---|---|---|---|---|"]
        for m, t in s["training"].items():
            mfu = "-" if t.get("mfu") is None else f"{t['mfu']:.1%}"
            tps = "-" if t.get("tokens_per_second") is None else f"{t['tokens_per_second']:.0f}"
            lines.append(f"| {m} | {t.get('batch_size')} | {t.get('steps')} | {t.get('seconds')} | {tps} | {mfu} | {t.get('compiled')} |")
        lines.append("")
    probe_ = s.get("probe") or {}
    if probe_.get("rungs"):
        lines += ["Probe (first seconds of the run): " + "; ".join(
            f"{m} {r['step_seconds']:.3f} s a step at batch {r['batch']} ({1000 * r['example_seconds']:.1f} ms an example)"
            + (f", compiled {r['compiled_step_seconds']:.3f} s after {r['compile_seconds']:.0f} s compiling"
               if "compiled_step_seconds" in r else "")
            for m, r in probe_["rungs"].items()) + "; decoding " + ", ".join(
            f"{1000 * v:.1f} ms a step at batch {b}" for b, v in probe_.get("decode_step_seconds", {}).items()) + ".", ""]
    if s.get("phases"):
        lines += ["Wall seconds by phase: " + ", ".join(f"{k} {v}" for k, v in s["phases"].items()) + ".", ""]
    for e in s.get("errors", []):
        lines += [f"Error in {e['where']}: `{e['error']}`", ""]
    lines += [f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


def rung_config(recipe: str, overrides: list[str], rung: dict, method: str):
    return load_config(recipe, [*overrides, *planner.overrides(rung, method)])


def work_of(config, splits) -> planner.Work:
    e = config.eval
    return planner.Work(len(splits["train"]), len(splits["valid"]), len(splits["test"]), e.batch_size,
                        config.task.max_new_tokens, tuple(e.timing_batch_sizes), e.timing_examples, e.timing_rounds)


def train(run: Run, recipe: str, overrides: list[str], costs, work, splits, methods, measured_after, models) -> None:
    """Train `methods` in order, each planned from the seconds then left; a failed rung is
    recorded and the ladder goes on without it (and without the rungs that start from it)."""
    for i, method in enumerate(methods):
        if method == "system15" and "latent" not in models or method in ("pause", "coconut", "latent") and "cot" not in models:
            run.summary["errors"].append({"where": method, "error": "skipped: the rung it starts from failed"})
            continue
        began = time.time()
        p = planner.plan(costs, work, run.left(), run.summary["budget_seconds"], tuple(methods[i:]), measured_after)
        rung = p["rungs"][method]
        run.summary["plans"].append({"before": method, "elapsed": round(run.elapsed(), 1), **p})
        run.save()
        print(f"[{run.elapsed():.0f} s] {method}: {json.dumps(rung)}", flush=True)
        for attempt in range(2):
            try:
                config = rung_config(recipe, overrides, rung, method)
                models[method] = ladder_rung(config, method, splits, run.runs)
                break
            except torch.OutOfMemoryError as e:  # half the batch, once, from scratch
                run.summary["errors"].append({"where": f"{method} at batch {rung['batch_size']}", "error": str(e)[:300]})
                for d in run.runs.glob(f"{method}*"):
                    shutil.rmtree(d, ignore_errors=True)
                torch.cuda.empty_cache()
                rung = {**rung, "batch_size": max(1, rung["batch_size"] // 2)}
            except Exception as e:  # recorded; the ladder goes on
                run.summary["errors"].append({"where": method, "error": f"{type(e).__name__}: {e}"[:2000]})
                traceback.print_exc()
                break
        if method in models:
            done = json.loads((run.runs / method / "done.json").read_text())
            run.summary["training"][method] = {"batch_size": rung["batch_size"], "planned_steps": rung["steps"],
                                               "compiled": rung["compile"], **done}
        run.phase(f"train {method}", began)


def measure_rungs(run: Run, config, models: dict, splits) -> dict[str, dict]:
    """Test accuracy, and batch-1/8/64 latency, of `models` (timed in the same run); rows by method."""
    with autocast(config):
        rows, records = measure(config, models, splits, run.runs)
    for r in rows:
        r.update(training_record(run.runs / r["method"]))
        done = run.summary["training"].get(r["method"], {})
        r.update({k: done.get(k) for k in ("tokens_per_second", "mfu")})
    path = run.out / "records.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    write_text_atomic(path, json.dumps({**saved, **records}))
    return {r["method"]: r for r in rows}


def compare_with_hf(run: Run, config, models: dict) -> dict:
    """Our full path against HF `generate` at batch 1, on the same model and tokens (speed.py)."""
    model = models.get("system15")
    if model is None:
        model = copy.deepcopy(next(iter(models.values())))
        model.add_shortcuts()
    out = run_speed(config, model=model, batch_sizes=[1], steps=planner.Work.hf_steps, rounds=planner.Work.hf_rounds,
                    fractions=(0.0,), patterns=("deep",), profile=False, quiet=True,
                    results_root=run.runs / "speed", command="recipes/gsm8k_gpu/run.py (batch 1)")
    hf = out["hf_generate"]["1"]
    return {**hf, "agreement": out["full_path_agrees_with_hf"]["1"], "model": model.method, "steps": out["settings"]["steps"],
            "rounds": out["settings"]["rounds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--out", required=True, help="where summary.json, summary.md, logs.tgz and records.json go")
    ap.add_argument("--runs", default="/tmp/gsm8k_gpu/runs", help="checkpoints (never returned)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run, from --started")
    ap.add_argument("--started", type=float, default=None, help="when the command began (epoch seconds)")
    ap.add_argument("--command", default=None, help="the command line, as summary.json records it")
    ap.add_argument("--commit", default=None, help="the commit, where the working tree has no .git")
    ap.add_argument("--device-info", default=None, help="a file with nvidia-smi's line")
    ap.add_argument("--compile", choices=("probe", "none"), default="none",
                    help="probe: on a GPU, time CoT's step compiled too, compiling included, and compile the "
                         "sequence rungs where it pays (tracing the 30-layer step took 170 s on this project's "
                         "2-core CPU: more than a 9-minute window can win back, so off unless asked)")
    ap.add_argument("--extras", choices=("auto", "none"), default="auto", help="pause and Coconut if time remains")
    ap.add_argument("--probe-steps", default=f"{2},{3}", help="warm-up and timed steps per rung in the probe")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    started = args.started or time.time()
    out, runs = Path(args.out), Path(args.runs) / "gsm8k_gpu"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(runs, ignore_errors=True)  # a window trains from scratch: a rung left by another plan would be refused
    runs.mkdir(parents=True)
    config = load_config(args.recipe, args.overrides)
    device = device_for(config)
    info = Path(args.device_info).read_text().strip() if args.device_info and Path(args.device_info).exists() else None
    commit = git_revision()
    if commit == "unknown" and args.commit:
        commit = Path(args.commit).read_text().strip() if Path(args.commit).exists() else args.commit
    run = Run(out, runs, {
        "status": "running", "task": config.task.name, "backbone": backbone_name(config),
        "device": device_name() + (f" ({info})" if info else ""), "precision": precision_for(config),
        "command": args.command or " ".join(["python", *sys.argv]), "commit": commit,
        "torch": torch.__version__, "budget_seconds": args.budget, "phases": {}, "plans": [], "training": {},
        "errors": [], "rows": [], "config": config.to_dict()}, started)
    run.save()
    began = time.time()
    splits = load_splits(config)
    work = work_of(config, splits)
    run.summary["splits"] = {k: len(v) for k, v in splits.items()}
    warm, timed = (int(n) for n in args.probe_steps.split(","))
    compile_for = ("cot",) if args.compile == "probe" and device.type == "cuda" else ()
    if compile_for:
        from torch import _dynamo

        _dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager
    costs, report = probe(config, splits, planner.CORE, compile_for, warm, timed)
    run.summary["probe"] = report
    write_text_atomic(runs / "probe.json", json.dumps(report, indent=2, default=str))
    run.phase("probe", began)

    models: dict = {}
    train(run, args.recipe, args.overrides, costs, work, splits, planner.CORE, planner.CORE, models)
    if models:
        began = time.time()
        by = measure_rungs(run, config, models, splits)
        run.summary["rows"] = [by[m] for m in planner.CORE if m in by]
        run.phase("test and timing", began)
        began = time.time()
        try:
            with torch.inference_mode():
                run.summary["hf_generate"] = compare_with_hf(run, config, models)
        except Exception as e:
            run.summary["errors"].append({"where": "HF comparison", "error": f"{type(e).__name__}: {e}"[:2000]})
            traceback.print_exc()
        run.phase("HF comparison", began)

    extras = planner.extras_fit(costs, work, run.left(), args.budget) if args.extras == "auto" and "cot" in models else ()
    run.summary["extras"] = {"ran": list(extras), "seconds_left": round(run.left(), 1)}
    if extras:
        train(run, args.recipe, args.overrides, costs, work, splits, extras, ("cot", *extras), models)
        ran = {m: models[m] for m in ("cot", *extras) if m in models}
        if len(ran) > 1:
            began = time.time()
            by = measure_rungs(run, config, ran, splits)  # timed beside CoT, whose test records are reused
            run.summary["rows"] += [by[m] for m in extras if m in by]
            run.phase("extras: test and timing", began)
    run.summary["status"] = "done" if not run.summary["errors"] else "done with errors"
    run.save()
    print(markdown_table(run.summary["rows"], ROW_KEYS) if run.summary["rows"] else "no rows", flush=True)
    print(f"[{run.elapsed():.0f} s of {args.budget:.0f}] written: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
