"""Latency measurement: every method timed in the same interleaved rounds."""

from __future__ import annotations

import math

import system15.evaluate as evaluate_module
from system15.engine import FULL
from system15.evaluate import measure_latencies

from conftest import tiny_model


def test_latencies_are_timed_in_interleaved_rounds(examples, monkeypatch):
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
    one_round = [(0, 2), (0, 2), (2, 2), (2, 2)]  # each run's two batches, then the next run's
    assert calls == warm_up + one_round + one_round
