"""Evaluation: generate, score, and count what each answer cost.

Per example: correct?, decoding steps (thought steps + generated tokens), FLOPs counted from
the layers that ran, and which layers each step skipped (split by criticality). Latency is
measured separately (`measure_latencies`) so that every method is timed in the same run, on the
same examples and at the same batch size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .data import Example, answers_match
from .engine import fill_kv, generate, prefill
from .inference import Answer
from .layout import encode, prompt
from .runtime import synchronize


@dataclass
class Record:
    source: str
    gold: str
    predicted: str | None
    correct: bool
    decoding_steps: int
    forwards: int                  # single-position forward passes after the prefill
    flops: int
    skipped_critical: int = 0      # layers skipped on critical steps
    layers_critical: int = 0       # layers visited on critical steps
    skipped_noncritical: int = 0
    layers_noncritical: int = 0


def record_of(example: Example, a: Answer) -> Record:
    """An answer scored against its example's gold answer, its layers counted by criticality
    (a step of unknown criticality counts as non-critical)."""
    rec = Record(example.source, example.answer, a.answer, answers_match(a.answer, example.answer), a.decoding_steps,
                 len(a.routes), a.flops)
    for step in a.routes:
        if step.critical:
            rec.skipped_critical += step.skipped
            rec.layers_critical += len(step.ran)
        else:
            rec.skipped_noncritical += step.skipped
            rec.layers_noncritical += len(step.ran)
    return rec


def evaluate(model, examples: list[Example], *, desc: str | None = None, **options) -> list[Record]:
    """Greedy answers for `examples`, one Record each, in order: `model.answer` with its
    `options` (K, lambda_depth, kv_policy, shortcuts, batch_size, max_new_tokens; each the
    model's own unless given), `desc` labelling a progress bar."""
    return [record_of(e, a) for e, a in zip(examples, model.answer(examples, progress=desc, **options))]


def accuracy(records: list[Record]) -> float:
    return sum(r.correct for r in records) / max(1, len(records))


def chain_shape(ex: Example) -> str:
    """A chain's steps as letters: C for a critical step, n for a non-critical one ("nnCC")."""
    return "".join("C" if step.critical else "n" for step in ex.steps)


def accuracy_by_shape(records: list[Record], examples: list[Example], most: int = 6) -> dict[str, float] | None:
    """Accuracy per chain shape (`chain_shape`), the most frequent shape first; None where the
    examples have more than `most` shapes (GSM8K's chains are too varied to group this way)."""
    shapes = {ex.source: chain_shape(ex) for ex in examples}
    counts: dict[str, list[int]] = {}
    for r in records:
        count = counts.setdefault(shapes[r.source], [0, 0])
        count[0] += r.correct
        count[1] += 1
    if len(counts) > most:
        return None
    return {shape: right / n for shape, (right, n) in sorted(counts.items(), key=lambda kv: -kv[1][1])}


def summarize(records: list[Record]) -> dict:
    n = max(1, len(records))
    steps = sum(r.decoding_steps for r in records)
    lc = sum(r.layers_critical for r in records)
    ln = sum(r.layers_noncritical for r in records)
    skipped = sum(r.skipped_critical + r.skipped_noncritical for r in records)
    return {
        "accuracy": accuracy(records),
        "decoding_steps": steps / n,
        "flops_per_step": sum(r.flops for r in records) / max(1, sum(r.forwards for r in records)),
        "skip_frac_critical": sum(r.skipped_critical for r in records) / lc if lc else 0.0,
        "skip_frac_noncritical": sum(r.skipped_noncritical for r in records) / ln if ln else 0.0,
        "forwards_per_example": sum(r.forwards for r in records) / n,
        "layers_run_per_example": (lc + ln - skipped) / n,
        "critical_layers_per_example": lc / n,
        "examples": len(records),
    }


def measure_latencies(runs: dict[str, tuple], examples: list[Example], *, batch_size: int = 1,
                      max_new_tokens: int = 64, rounds: int = 1) -> dict[str, float]:
    """Milliseconds per example (wall clock) for each named run `(model, K, route)`.

    The runs are interleaved batch by batch: each round goes through the batches once, and
    times every run on a batch before moving to the next. Each (run, batch) keeps its best
    time over the rounds, and a run's latency is the sum of its batches' best times. A slow
    spell of a noisy machine then lasts a batch, not a whole method, and touches every method
    alike: a long method (CoT) no longer needs a whole quiet round to show its real cost, as
    it did when each run kept its best whole round. Each run gets a warm-up batch first."""
    prompts = {}
    for name, (model, K, route) in runs.items():
        model.eval()
        prompts[name] = [prompt(model.tokenizer, encode(model.tokenizer, ex)) for ex in examples]
        generate(model, prompts[name][:batch_size], K=K, route=route, max_new_tokens=max_new_tokens, account=False)
    starts = range(0, len(examples), batch_size)
    best = {name: [float("inf")] * len(starts) for name in runs}
    for _ in range(rounds):
        for i, start in enumerate(starts):
            for name, (model, K, route) in runs.items():
                synchronize()
                began = time.perf_counter()
                generate(model, prompts[name][start:start + batch_size], K=K, route=route,
                         max_new_tokens=max_new_tokens, account=False)
                synchronize()
                best[name][i] = min(best[name][i], time.perf_counter() - began)
    return {name: 1000 * sum(times) / len(examples) for name, times in best.items()}


@torch.inference_mode()  # as generate runs
def latency_breakdown(model, example: Example, *, repeats: int = 300) -> dict[str, float]:
    """Where batch-1 decoding time goes, in microseconds (median of `repeats` calls, the parts
    timed in turn within each repeat), on one example's prompt: the prefill; one full layer
    f_l; the three parts of a skipped layer (the router, the two adapters, the
    kv_policy="fill" K/V write); and a decoding step's work outside its layers (input, mask,
    final norm, head, argmax). Layer figures are for layer 1.
    Needs a model with shortcuts (the router and adapters are timed too, in the folded form
    the hard choice runs: shortcuts.FoldedShortcut)."""
    model.eval()
    tok, bb, fold = model.tokenizer, model.backbone, model.shortcuts.folded(model.backbone)[0]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt(tok, encode(tok, example))], device=device)
    visible = torch.ones_like(ids, dtype=torch.bool)
    cache, last, prev, positions = prefill(model, ids, visible)
    x = model.thought_input(0, last)
    h = bb.layer_input(x[:, None], positions[:, None])
    ctx = bb.context(h, positions[:, None], cache)
    normed, act, _ = fold.decide(h[:, 0])

    def outside_layers():
        hh = bb.layer_input(x[:, None], positions[:, None])
        bb.context(hh, positions[:, None], cache)
        return bb.head(bb.final_norm(hh)[:, 0]).argmax(-1)

    parts = {
        "prefill": lambda: prefill(model, ids, visible),
        "full_layer": lambda: bb.run_layer(0, h, ctx, cache),
        "router": lambda: fold.decide(h[:, 0])[2].view(-1).tolist(),  # the decision, read on the host
        "adapters": lambda: fold.branch(h[:, 0], act, prev[0]),
        "kv_fill": lambda: fill_kv(bb, fold, 0, h, normed, ctx),
        "step_outside_layers": outside_layers,
    }
    times = time_in_turn(parts, repeats)
    return {f"{name}_us": 1e6 * sorted(t)[len(t) // 2] for name, t in times.items()}


def time_in_turn(parts: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call (name -> call) over `repeats`, after one untimed call each; the
    calls are timed in turn within each repeat, so a slow spell touches them all alike."""
    for call in parts.values():
        call()
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, call in parts.items():
            synchronize()
            began = time.perf_counter()
            call()
            synchronize()
            times[name].append(time.perf_counter() - began)
    return times


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
