"""The learning-rate schedule: warm-up, cosine decay over the steps, or over the wall-clock
budget when `decay_by: budget` (a run the clock stops must still end annealed)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest

from system15.config import ConfigError, TrainConfig
from system15.train import loop
from system15.train.loop import fit, learning_rate

from tiny_run import tiny_config, tiny_setup

PEAK = 1e-3


def cosine(progress: float) -> float:
    return PEAK * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def test_steps_schedule_ignores_the_clock():
    cfg = TrainConfig(steps=1100, warmup=100, lr=PEAK, max_minutes=10)
    assert learning_rate(cfg, 0) == pytest.approx(PEAK / 100)
    assert learning_rate(cfg, 600, seconds=590) == pytest.approx(cosine(0.5))
    assert learning_rate(cfg, 1100, seconds=0) == pytest.approx(PEAK * 0.1)


def test_budget_schedule_follows_whichever_runs_out_first():
    cfg = TrainConfig(steps=1100, warmup=100, lr=PEAK, max_minutes=10, decay_by="budget")
    assert learning_rate(cfg, 50, seconds=300) == pytest.approx(PEAK * 51 / 100)  # warm-up stays by steps
    assert learning_rate(cfg, 200, seconds=300) == pytest.approx(cosine(0.5))  # the clock is further on
    assert learning_rate(cfg, 850, seconds=300) == pytest.approx(cosine(0.75))  # the steps are further on
    assert learning_rate(cfg, 300, seconds=600) == pytest.approx(PEAK * 0.1)  # the cap: annealed
    assert learning_rate(cfg, 300, seconds=900) == pytest.approx(PEAK * 0.1)  # and never past the floor
    uncapped = dataclasses.replace(cfg, max_minutes=None)
    assert learning_rate(uncapped, 600, seconds=1e6) == pytest.approx(cosine(0.5))


def test_decay_by_is_checked():
    with pytest.raises(ConfigError, match=r"decay_by: Input should be 'steps' or 'budget', got 'time'"):
        TrainConfig(decay_by="time")


def test_linear_decay_to_a_floor():
    cfg = TrainConfig(steps=1100, warmup=100, lr=PEAK, decay="linear", lr_floor=0.0)
    assert learning_rate(cfg, 100) == pytest.approx(PEAK)
    assert learning_rate(cfg, 350) == pytest.approx(PEAK * 0.75)
    assert learning_rate(cfg, 1100) == pytest.approx(0.0)
    cosine_to_zero = dataclasses.replace(cfg, decay="cosine")
    assert learning_rate(cosine_to_zero, 600) == pytest.approx(PEAK * 0.5)
    assert learning_rate(cosine_to_zero, 350) == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(dataclasses.replace(cfg, lr_floor=0.2), 600) == pytest.approx(PEAK * 0.6)


def test_decay_shape_and_floor_are_checked():
    with pytest.raises(ConfigError, match=r"decay: Input should be 'cosine' or 'linear', got 'step'"):
        TrainConfig(decay="step")
    with pytest.raises(ConfigError, match=r"lr_floor: Input should be less than or equal to 1, got 1\.5"):
        TrainConfig(lr_floor=1.5)


@pytest.mark.parametrize("decay_by", ["steps", "budget"])
def test_a_run_the_clock_stops_ends_annealed_only_with_budget_decay(decay_by, tmp_path, monkeypatch):
    """A fake clock that moves 10 s per reading stops a 40-step run near step 6 of its 1-minute
    cap; the learning rate its last step used is the floor only when the decay follows the budget."""
    ticks = iter(range(0, 10**6, 10))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    config = tiny_config(steps=40, eval_every=40)
    cfg = dataclasses.replace(config.stage("cot"), warmup=1, max_minutes=1, decay_by=decay_by)
    model, objective, train, _ = tiny_setup(config)
    summary = fit(model, objective, train, cfg, tmp_path / "run", quiet=True)
    assert summary["steps"] < 10
    last = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
            if '"lr"' in line][-1]
    floor = cfg.lr * 0.1
    if decay_by == "budget":
        assert last["lr"] < floor * 1.1
    else:
        assert last["lr"] > cfg.lr * 0.9
