"""Latency measurement: every method timed in the same rounds, interleaved batch by batch."""

from __future__ import annotations

import math

import system15.evaluate as evaluate_module
from system15.engine import FULL
from system15.evaluate import measure_latencies

from tests.helpers import tiny_model


def test_latencies_are_timed_batch_by_batch_in_interleaved_rounds(examples, monkeypatch):
    model = tiny_model(examples)
    calls = []
    real_generate = evaluate_module.generate

    def spy(m, prompts, *, K, **kwargs):
        calls.append((K, len(prompts)))
        return real_generate(m, prompts, K=K, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", spy)
    runs = {"answer only": (model, 0, FULL), "two thoughts": (model, 2, FULL)}
    ms = measure_latencies(runs, examples[:4], batch_size=2, max_new_tokens=4, rounds=2)

    assert set(ms) == set(runs) and all(math.isfinite(v) and v > 0 for v in ms.values())
    warm_up = [(0, 2), (2, 2)]
    one_round = [(0, 2), (2, 2), (0, 2), (2, 2)]  # every run on the first batch, then on the second
    assert calls == warm_up + one_round + one_round


def test_each_batch_keeps_its_best_round(examples, monkeypatch):
    """A run's latency is the sum over batches of each batch's fastest round: a slow spell
    in one round costs only the batch it hit."""
    model = tiny_model(examples)
    clock = [0.0]
    # seconds each generate call "takes": warm-ups, then round 1 and round 2, batch by batch
    durations = iter([9.0, 9.0,            # warm-ups (not counted)
                      1.0, 5.0, 8.0, 2.0,  # round 1: batch 1 (a, b), batch 2 (a, b): a's batch 2 hit a slow spell
                      3.0, 4.0, 1.5, 6.0])  # round 2

    def fake_generate(m, prompts, **kwargs):
        clock[0] += next(durations)

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    monkeypatch.setattr(evaluate_module.time, "perf_counter", lambda: clock[0])
    runs = {"a": (model, 0, FULL), "b": (model, 2, FULL)}
    ms = measure_latencies(runs, examples[:4], batch_size=2, max_new_tokens=4, rounds=2)
    assert ms == {"a": 1000 * (1.0 + 1.5) / 4, "b": 1000 * (4.0 + 2.0) / 4}
