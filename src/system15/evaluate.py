"""Evaluation: generate, score, and count what each answer cost.

Per example: correct?, decoding steps (thought steps + generated tokens), FLOPs counted from
the layers that ran, and which layers each step skipped (split by criticality). Latency is
measured separately (`measure_latency`) so that every method is timed in the same run, on the
same examples and at the same batch size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .data import Example, answers_match, extract_answer
from .engine import FULL, Generation, Route, generate
from .layout import encode, prompt, thought_critical


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


def _digit_token(tok, token_id: int | None) -> bool:
    return token_id is not None and any(ch.isdigit() for ch in tok.decode([token_id]))


def _record(model, ex: Example, gen: Generation, K: int | None) -> Record:
    tok = model.tokenizer
    text = tok.decode(gen.tokens)
    predicted = extract_answer(text)
    rec = Record(ex.source, ex.answer, predicted, answers_match(predicted, ex.answer), gen.decoding_steps,
                 len(gen.ran), gen.flops)
    thought_flags = thought_critical(encode(tok, ex), K) if K else []
    for i, (ran, emitted) in enumerate(zip(gen.ran, gen.emitted)):
        critical = thought_flags[i] if i < len(thought_flags) else _digit_token(tok, emitted)
        skipped = sum(1 for r in ran if not r)
        if critical:
            rec.skipped_critical += skipped
            rec.layers_critical += len(ran)
        else:
            rec.skipped_noncritical += skipped
            rec.layers_noncritical += len(ran)
    return rec


def evaluate(model, examples: list[Example], *, K: int | None, route: Route = FULL, batch_size: int = 64,
             max_new_tokens: int = 64, desc: str | None = None) -> list[Record]:
    """Greedy answers for `examples`, one Record each, in order."""
    model.eval()
    tok = model.tokenizer
    records = []
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc=desc or "eval", disable=desc is None, leave=False, dynamic_ncols=True):
        chunk = examples[start:start + batch_size]
        prompts = [prompt(tok, encode(tok, ex)) for ex in chunk]
        gens = generate(model, prompts, K=K, route=route, max_new_tokens=max_new_tokens)
        records += [_record(model, ex, g, K) for ex, g in zip(chunk, gens)]
    return records


def accuracy(records: list[Record]) -> float:
    return sum(r.correct for r in records) / max(1, len(records))


def summarize(records: list[Record]) -> dict:
    n = max(1, len(records))
    steps = sum(r.decoding_steps for r in records)
    lc = sum(r.layers_critical for r in records)
    ln = sum(r.layers_noncritical for r in records)
    return {
        "accuracy": accuracy(records),
        "decoding_steps": steps / n,
        "flops_per_step": sum(r.flops for r in records) / max(1, sum(r.forwards for r in records)),
        "skip_frac_critical": sum(r.skipped_critical for r in records) / lc if lc else 0.0,
        "skip_frac_noncritical": sum(r.skipped_noncritical for r in records) / ln if ln else 0.0,
        "examples": len(records),
    }


def measure_latency(model, examples: list[Example], *, K: int | None, route: Route = FULL, batch_size: int = 1,
                    max_new_tokens: int = 64, repeats: int = 1) -> float:
    """Milliseconds per example (wall clock, best of `repeats` after a warm-up batch)."""
    model.eval()
    tok = model.tokenizer
    prompts = [prompt(tok, encode(tok, ex)) for ex in examples]
    generate(model, prompts[:batch_size], K=K, route=route, max_new_tokens=max_new_tokens, account=False)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        began = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            generate(model, prompts[start:start + batch_size], K=K, route=route, max_new_tokens=max_new_tokens,
                     account=False)
        _sync()
        best = min(best, time.perf_counter() - began)
    return 1000 * best / len(prompts)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
