"""Results files: results/<name>/summary.json, summary.md and the figures.

summary.json keeps the schema every results command shares:
{"task", "backbone", "device", "command", "rows": [{"method", "accuracy", "decoding_steps",
"flops_per_step", "latency_ms", "speedup_vs_cot", ...}], ...}; rows only gain keys.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from .checkpoint import write_text_atomic
from .config import upgrade

COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("accuracy_without_average", "without the weight average", "{:.1%}"),
    ("decoding_steps", "decoding steps", "{:.1f}"),
    ("flops_per_step", "FLOPs / step", "{:.3g}"),
    ("flops_reduction_vs_latent", "FLOPs reduction vs latent", "{:.2f}x"),
    ("latency_ms", "latency b=1 (ms)", "{:.2f}"),
    ("speedup_vs_cot", "speedup vs CoT b=1", "{:.2f}x"),
    ("speedup_vs_cot_b8", "b=8", "{:.2f}x"),
    ("speedup_vs_cot_b64", "b=64", "{:.2f}x"),
    ("speedup_vs_latent", "speedup vs latent b=1", "{:.2f}x"),
    ("speedup_vs_latent_b8", "b=8", "{:.2f}x"),
    ("speedup_vs_latent_b64", "b=64", "{:.2f}x"),
    ("latency_vs_nocot", "latency vs No-CoT b=1", "{:.2f}x"),
    ("latency_vs_nocot_b8", "b=8", "{:.2f}x"),
    ("latency_vs_nocot_b64", "b=64", "{:.2f}x"),
    ("skip_frac_critical", "layers skipped: critical", "{:.1%}"),
    ("skip_frac_noncritical", "non-critical", "{:.1%}"),
    ("best_valid_accuracy", "best validation accuracy", "{:.1%}"),
    ("train_steps", "training steps", "{}"),
    ("train_seconds", "training seconds", "{:.0f}"),
    ("train_examples", "training examples (steps x batch)", "{:,}"),
    ("configs_tried", "configurations tried", "{}"),
    ("probe_readout", "probe read-out after latent step k", "{:.0%}"),
    ("accuracy_by_shape", "accuracy by chain shape", "{:.0%}"),
    ("overrides", "overrides", "`{}`"),
]


# the front page's table: what each method costs and keeps, at a glance
COMPACT = ("method", "accuracy", "decoding_steps", "flops_reduction_vs_latent", "speedup_vs_cot", "latency_vs_nocot",
           "latency_vs_nocot_b8", "latency_vs_nocot_b64", "skip_frac_critical", "skip_frac_noncritical",
           "train_examples", "configs_tried")


def device_name(device: torch.device | None = None) -> str:
    """The device a results file names: `device`, or the first GPU when there is one, else the CPU."""
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def with_budget(summary: dict) -> list[dict]:
    """The summary's rows, each with its training budget: `train_examples` (steps trained x batch
    size), which a row written before rows carried it gets from its `train_steps` and the batch
    size its recipe (the summary's config) gave that rung; ablation variants, whose settings
    differ from the recipe's, are left as they are."""
    stages = (summary.get("config") or {}).get("stages") or {}
    rows = []
    for row in summary["rows"]:
        batch = (stages.get(row.get("method")) or {}).get("batch_size")
        if "train_examples" not in row and row.get("train_steps") is not None and batch:
            row = {**row, "train_examples": row["train_steps"] * batch}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], keys: tuple[str, ...] | None = None) -> str:
    """The rows as a Markdown table: every column some row has (of `keys`, if given)."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows) and (keys is None or c[0] in keys)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), fmt) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    """A table cell: empty for missing or NaN values; lists are written item by item, and
    dicts key by key."""
    if isinstance(value, dict):
        return " / ".join(f"{key} {_cell(v, fmt)}" for key, v in value.items())
    if isinstance(value, list):
        return " / ".join(_cell(v, fmt) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt.format(value)


# The bars the project set itself on the default task (its stage-1 and System-1.5 issues).
STAGE1_SHARE_OF_COT = 0.9       # stage 1 reaches 90% of CoT-SFT's accuracy...
STAGE1_MARGIN_POINTS = 20.0     # ...and beats No-CoT and pause tokens by 20 points
SYSTEM15_GAP_POINTS = 2.0       # System-1.5 stays within 2 points of stage 1...
SYSTEM15_FLOPS_REDUCTION = 1.5  # ...with 1.5x fewer FLOPs per decoding step...
SYSTEM15_SPEEDUP_B1 = 10.0      # ...and 10x the speed of CoT at batch 1
_ROUNDING = 1e-9                # a figure exactly at its bar meets it, whatever the float rounding


def bars(rows: list[dict]) -> list[str]:
    """This run against the bars above, one Markdown bullet each: the figure and whether it
    is met. A bar whose rows the run lacks is left out."""
    by = {r["method"]: r for r in rows}
    cot, latent, s15 = by.get("cot"), by.get("latent"), by.get("system15")
    lines = []

    def bar(what: str, figure: str, met: bool) -> None:
        lines.append(f"- {what}: {figure}. **{'Met' if met else 'Not met'}.**")

    if latent and cot:
        need = STAGE1_SHARE_OF_COT * cot["accuracy"]
        bar(f"Stage 1 reaches at least {STAGE1_SHARE_OF_COT:.0%} of CoT's accuracy",
            f"{latent['accuracy']:.1%} against {need:.1%} ({STAGE1_SHARE_OF_COT:.0%} of {cot['accuracy']:.1%})",
            latent["accuracy"] >= need - _ROUNDING)
    for name, label in (("pause", "pause tokens"), ("nocot", "No-CoT")):
        if latent and name in by:
            margin = 100 * (latent["accuracy"] - by[name]["accuracy"])
            bar(f"Stage 1 beats {label} by at least {STAGE1_MARGIN_POINTS:.0f} points",
                f"{margin:+.1f} points ({latent['accuracy']:.1%} against {by[name]['accuracy']:.1%})",
                margin >= STAGE1_MARGIN_POINTS - _ROUNDING)
    if s15 and latent:
        gap = 100 * (s15["accuracy"] - latent["accuracy"])
        bar(f"System-1.5 within {SYSTEM15_GAP_POINTS:.0f} points of stage 1",
            f"{gap:+.1f} points ({s15['accuracy']:.1%} against {latent['accuracy']:.1%})", abs(gap) <= SYSTEM15_GAP_POINTS + _ROUNDING)
    if s15 and "flops_reduction_vs_latent" in s15:
        bar(f"System-1.5 takes at least {SYSTEM15_FLOPS_REDUCTION:g}x fewer FLOPs per decoding step than stage 1",
            f"{s15['flops_reduction_vs_latent']:.2f}x", s15["flops_reduction_vs_latent"] >= SYSTEM15_FLOPS_REDUCTION - _ROUNDING)
    if s15 and "speedup_vs_cot" in s15:
        others = [f"batch {b}: {s15[f'speedup_vs_cot_b{b}']:.2f}x" for b in (8, 64) if f"speedup_vs_cot_b{b}" in s15]
        bar(f"System-1.5 is at least {SYSTEM15_SPEEDUP_B1:g}x faster than CoT at batch 1",
            f"{s15['speedup_vs_cot']:.2f}x ({', '.join(others) or 'batch 1 only'})",
            s15["speedup_vs_cot"] >= SYSTEM15_SPEEDUP_B1 - _ROUNDING)
    if s15 and "skip_frac_critical" in s15:
        nc, c = s15["skip_frac_noncritical"], s15["skip_frac_critical"]
        bar("Non-critical steps skip more layers than critical ones", f"{nc:.1%} of their layers against {c:.1%}", nc > c)
    return lines


def notes(summary: dict) -> list[str]:
    """What summary.md says below its table, as Markdown paragraphs: the bars (a ladder's
    run only), stage 1's alignment rules, the timing noise, System-1.5's batch-1 latency taken apart. The README
    quotes them (`sync_page`), so it never carries a figure of an older run."""
    out, by = [], {r["method"]: r for r in summary["rows"]}
    met = [] if "ablation" in summary else bars(summary["rows"])  # an ablation's rows are variants, not the ladder
    if met:
        out.append("Against the bars set for the default task:\n" + "\n".join(met))
    if summary.get("stage1_align"):
        out.append("Stage-1 alignment rules (validation accuracy): " +
                   ", ".join(f"{k}: {v:.1%}" for k, v in summary["stage1_align"].items() if isinstance(v, float)) +
                   f"; chosen: {summary['stage1_align'].get('chosen')}")
    avg = summary.get("stage1_average")
    if avg:
        out.append(f"Stage-1 weight average (`train.ema` {avg['ema']:g}), at its last step ({avg['step']}): "
                   f"{avg['test_average']:.1%} on test against {avg['test_own']:.1%} for the weights training ended with; "
                   f"{avg['valid_average']:.1%} against {avg['valid_own']:.1%} on validation.")
    grid = summary.get("stage2_mu")
    if grid:
        out.append(f"Stage-2 compute weights mu (validation accuracy; stage 1: {grid['stage1']:.1%}): " +
                   ", ".join(f"{mu}: {acc:.1%}" for mu, acc in grid["scores"].items()) +
                   f"; chosen: {grid['chosen']:g}, the largest within {grid['tolerance']:g} "
                   f"point{'s' * (grid['tolerance'] != 1)} of stage 1")
    pause = by.get("pause")
    if pause and "speedup_vs_latent" in pause and "latent" in by:
        gauge = " / ".join(f"{pause[k]:.2f}x" for k in ("speedup_vs_latent", "speedup_vs_latent_b8", "speedup_vs_latent_b64")
                           if k in pause)
        out.append("Timing noise of this run: pause tokens and the latent path do nearly the same work, and their "
                   f"latency ratio is {gauge} at batch 1 / 8 / 64.")
    s15, sweep = by.get("system15"), summary.get("sweep") or []
    arch = upgrade(summary["config"])[0]["architecture"] if sweep else {}  # results written before the regrouping too
    own = [p for p in sweep if p["K"] == arch["K"] and p["lambda_depth"] == arch["lambda_depth"]]
    if s15 and own and "speedup_vs_cot" in own[0]:
        out.append(f"The sweep times System-1.5's own setting again: {own[0]['speedup_vs_cot']:.2f}x faster than CoT at "
                   f"batch 1, against {s15['speedup_vs_cot']:.2f}x in the table.")
    parts = summary.get("system15_latency_parts")
    if parts:
        out.append(f"System-1.5 at batch 1, rebuilt from its parts: {parts['rebuilt_ms']:.2f} ms (measured "
                   f"{parts['measured_ms']:.2f} ms). Prefill {parts['prefill_us']:.0f} µs; a full layer {parts['full_layer_us']:.0f} µs; "
                   f"a skipped layer: router {parts['router_us']:.0f} + adapters {parts['adapters_us']:.0f} + K/V fill "
                   f"{parts['kv_fill_us']:.0f} µs; per step outside the layers {parts['step_outside_layers_us']:.0f} µs; "
                   f"{parts['layers_run_per_example']:.1f} layers run over {parts['forwards_per_example']:.1f} steps per example. "
                   f"If skipped layers and routers cost nothing, the speedup over CoT (rebuilt from the same parts: "
                   f"{parts['cot_rebuilt_ms']:.1f} ms) would be at most {parts['speedup_vs_cot_if_skips_were_free']:.2f}x.")
        if "speedup_vs_cot_if_only_critical_layers_ran" in parts:  # older summaries lack this bound
            out[-1] += (f" If every layer of every non-critical step were free and critical steps ran all of theirs "
                        f"({parts['critical_layers_per_example']:.1f} layers per example), at most "
                        f"{parts['speedup_vs_cot_if_only_critical_layers_ran']:.2f}x.")
    return out


PAGES = ("README.md", "docs/*.md")  # the pages that quote results, from the folder a results command runs in


def pages(root: str | Path = ".") -> list[Path]:
    """The Markdown pages whose results blocks `sync_pages` keeps in step (`PAGES`)."""
    return [page for pattern in PAGES for page in sorted(Path(root).glob(pattern))]


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """summary.json and summary.md in `out_dir`. The pages that quote them are rewritten by
    `sync_pages` (`system15 report --sync`), never as a side effect of a run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = [f"# {out.name}", "", f"task: `{summary['task']}` · backbone: `{summary['backbone']}` · device: {summary['device']}",
          "", markdown_table(with_budget(summary)), "", f"Regenerate: `{summary['command']}`", ""]
    md += [line for p in notes(summary) for line in (p, "")]
    write_text_atomic(out / "summary.md", "\n".join(md))
    return out / "summary.json"


def blocks(summary: dict) -> dict[str, str]:
    """What a page quoting `summary` shows in each kind of block (BLOCKS)."""
    rows = with_budget(summary)
    return {"results": markdown_table(rows), "compact": markdown_table(rows, COMPACT),
            "notes": "\n\n".join(notes(summary))}


def ladder_summaries(results_root: str | Path = "results") -> list[Path]:
    """The summary.json files of ladders and ablations under `results_root` (rows by method)."""
    found = []
    for path in sorted(Path(results_root).glob("*/summary.json")):
        rows = json.loads(path.read_text()).get("rows") or [{}]
        if all("method" in row for row in rows):
            found.append(path)
    return found


def sync_pages(results_root: str | Path = "results", to: list[str | Path] | None = None, write: bool = True) -> list[Path]:
    """Bring every block of the pages (`to`, default `pages()`) that quotes a summary under
    `results_root` in step with it; returns the pages that changed (or, with write=False,
    that would). Paths match as the pages write them, relative to the folder this runs in."""
    changed = []
    summaries = {path: blocks(json.loads(path.read_text())) for path in ladder_summaries(results_root)}
    for page in pages() if to is None else to:
        if any([sync_page(page, path, kinds, write=write) for path, kinds in summaries.items()]):  # a list: sync every one
            changed.append(Path(page))
    return changed


# <!-- results: PATH --> the table; <!-- compact: PATH --> its COMPACT columns; <!-- notes: PATH --> what follows it
BLOCKS = ("results", "compact", "notes")


def sync_page(page: str | Path, summary_path: str | Path, blocks: dict[str, str], write: bool = True) -> bool:
    """Replace each block a Markdown page quotes from `summary_path`, between
    `<!-- KIND: <summary_path> -->` and `<!-- /KIND -->`, by `blocks[KIND]` (KIND one of
    BLOCKS). The path is matched as written (relative to the folder the command runs
    in). Returns whether the page changed; a page that is missing or quotes no such block is
    left alone; `write=False` only tells whether it would change."""
    page = Path(page)
    if not page.is_file():
        return False
    text = new = page.read_text()
    for kind, body in blocks.items():
        if kind not in BLOCKS:
            raise ValueError(f"unknown block {kind!r}; known: {BLOCKS}")
        opening = f"<!-- {kind}: {Path(summary_path).as_posix()} -->\n"
        start = new.find(opening)
        if start < 0:
            continue
        begin = start + len(opening)
        end = new.find(f"\n<!-- /{kind} -->", begin - 1)  # begin - 1: an empty block's closing follows at once
        if end < 0:
            raise ValueError(f"{page}: the {kind} block for {summary_path} has no closing <!-- /{kind} -->")
        new = new[:begin] + body + new[end:]
    if new == text:
        return False
    if write:
        write_text_atomic(page, new)
    return True


def plot_sweep(out_dir: str | Path, sweep: list[dict], reference: dict[str, dict]) -> list[Path]:
    """The paper's Figure 4 (accuracy over lambda_depth x lambda_step) and a Pareto plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    depths = sorted({p["lambda_depth"] for p in sweep})
    steps = sorted({p["K"] for p in sweep})
    grid = [[next(p["accuracy"] for p in sweep if p["K"] == k and p["lambda_depth"] == d) for d in depths] for k in steps]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.8 * len(steps) + 1.8))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(steps)), [str(k) for k in steps])
    ax.set_xlabel("lambda_depth (router threshold)")
    ax.set_ylabel("lambda_step (latent steps K)")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("System-1.5 accuracy over thresholds")
    fig.tight_layout()
    heat = out / "sweep_heatmap.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k in steps:
        pts = [p for p in sweep if p["K"] == k]
        ax.scatter([p["speedup_vs_cot"] for p in pts], [p["accuracy"] for p in pts], alpha=0.8,
                   label=f"System-1.5, K={k} (lambda_depth {min(depths):g}..{max(depths):g})")
    for name, row in reference.items():
        ax.scatter([row["speedup_vs_cot"]], [row["accuracy"]], marker="s", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("wall-clock speedup vs CoT (batch 1, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against speed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    pareto = out / "pareto.png"
    fig.savefig(pareto, dpi=120)
    plt.close(fig)
    return [heat, pareto]


def _step_label(step) -> str:
    mark = {True: " *", False: "", None: " ?"}[step.critical]
    return ("thought" if step.kind == "thought" else repr(step.token)) + mark


def routing_map(answer) -> str:
    """An answer's route as text: a row per decoding step, a column per layer, '#' where the
    layer ran and '.' where the shortcut replaced it; '*' marks a critical step, '?' one of
    unknown criticality."""
    if not answer.routes:
        return "(no decoding steps after the prompt)"
    layers = len(answer.routes[0].ran)
    width = max(len(_step_label(s)) for s in answer.routes)
    lines = [f"{'step':>4}  {'':<{width}}  layers 1..{layers} (# ran, . skipped)"]
    for i, step in enumerate(answer.routes, 1):
        lines.append(f"{i:>4}  {_step_label(step):<{width}}  {''.join('#' if r else '.' for r in step.ran)}")
    skipped = sum(s.skipped for s in answer.routes)
    lines.append(f"layers skipped: {skipped} of {layers * len(answer.routes)}")
    return "\n".join(lines)


def plot_routes(answer, path: str | Path) -> Path:
    """The routing map as a picture: steps down, layers across, critical steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = [[1 if r else 0 for r in step.ran] for step in answer.routes] or [[0]]
    fig, ax = plt.subplots(figsize=(0.35 * len(grid[0]) + 3, 0.3 * len(grid) + 1.6))
    ax.imshow(grid, cmap=ListedColormap(["#e8e8e8", "#2b6cb0"]), vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(answer.routes)), [_step_label(s) for s in answer.routes], fontsize=7)
    ax.set_xticks(range(len(grid[0])), [str(i) for i in range(1, len(grid[0]) + 1)], fontsize=7)
    ax.set_xlabel("layer (blue: ran; grey: skipped by the shortcut)")
    ax.set_title(f"{answer.question[:60]}  ->  {answer.answer}  (* critical)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
