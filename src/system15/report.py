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

COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
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
    ("latency_vs_nocot", "latency vs No-CoT", "{:.2f}x"),
    ("skip_frac_critical", "layers skipped: critical", "{:.1%}"),
    ("skip_frac_noncritical", "non-critical", "{:.1%}"),
    ("best_valid_accuracy", "best validation accuracy", "{:.1%}"),
    ("train_steps", "training steps", "{}"),
    ("train_seconds", "training seconds", "{:.0f}"),
    ("probe_readout", "probe read-out after latent step k", "{:.0%}"),
    ("overrides", "overrides", "`{}`"),
]


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), fmt) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    """A table cell: empty for missing or NaN values; lists are written item by item."""
    if isinstance(value, list):
        return " / ".join(_cell(v, fmt) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt.format(value)


def write_summary(out_dir: str | Path, summary: dict, readme: str | Path | None = "README.md") -> Path:
    """summary.json and summary.md in `out_dir`; and the `readme`'s table of this summary.json,
    where it quotes one (see `sync_readme`), so the README stays in step with the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = [f"# {out.name}", "", f"task: `{summary['task']}` · backbone: `{summary['backbone']}` · device: {summary['device']}",
          "", markdown_table(summary["rows"]), "", f"Regenerate: `{summary['command']}`", ""]
    if summary.get("stage1_align"):
        md += ["Stage-1 alignment rules (validation accuracy): " +
               ", ".join(f"{k}: {v:.1%}" for k, v in summary["stage1_align"].items() if isinstance(v, float)) +
               f"; chosen: {summary['stage1_align'].get('chosen')}", ""]
    parts = summary.get("system15_latency_parts")
    if parts:
        md += [f"System-1.5 at batch 1, rebuilt from its parts: {parts['rebuilt_ms']:.2f} ms (measured "
               f"{parts['measured_ms']:.2f} ms). Prefill {parts['prefill_us']:.0f} µs; a full layer {parts['full_layer_us']:.0f} µs; "
               f"a skipped layer: router {parts['router_us']:.0f} + adapters {parts['adapters_us']:.0f} + K/V fill "
               f"{parts['kv_fill_us']:.0f} µs; per step outside the layers {parts['step_outside_layers_us']:.0f} µs; "
               f"{parts['layers_run_per_example']:.1f} layers run over {parts['forwards_per_example']:.1f} steps per example. "
               f"If skipped layers and routers cost nothing, the speedup over CoT (rebuilt from the same parts: "
               f"{parts['cot_rebuilt_ms']:.1f} ms) would be at most {parts['speedup_vs_cot_if_skips_were_free']:.2f}x.", ""]
    write_text_atomic(out / "summary.md", "\n".join(md))
    if readme is not None:
        sync_readme(readme, out / "summary.json", summary["rows"])
    return out / "summary.json"


def sync_readme(readme: str | Path, summary_path: str | Path, rows: list[dict]) -> bool:
    """Replace the table the README quotes from `summary_path`, between
    `<!-- results: <summary_path> -->` and `<!-- /results -->`, by the table of `rows`.
    The path is matched as written (relative to the folder the command runs in). Returns
    whether the README changed; a README that is missing or quotes no such table is left alone."""
    readme = Path(readme)
    if not readme.is_file():
        return False
    text = readme.read_text()
    opening = f"<!-- results: {Path(summary_path).as_posix()} -->\n"
    start = text.find(opening)
    if start < 0:
        return False
    body = start + len(opening)
    end = text.find("\n<!-- /results -->", body)
    if end < 0:
        raise ValueError(f"{readme}: the results block for {summary_path} has no closing <!-- /results -->")
    new = text[:body] + markdown_table(rows) + text[end:]
    if new == text:
        return False
    write_text_atomic(readme, new)
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
