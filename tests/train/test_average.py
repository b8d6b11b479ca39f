"""train.ema: the moving average of the weights, and what the loop does with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from system15.checkpoint import CheckpointError, load_average, save_training_state
from system15.model import load_reasoning_model
from system15.train.average import WeightAverage
from system15.train.loop import fit

from tests.helpers.tiny_run import tiny_config, tiny_setup


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_update_moves_the_average_a_fraction_of_the_way():
    model = net()
    params = list(model.parameters())
    average = WeightAverage(model, params, 0.75)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    average.update()
    for shadow, old in zip(average.shadow, before):
        torch.testing.assert_close(shadow, old + 0.25)


def test_applied_swaps_the_average_in_and_the_weights_back():
    model = net()
    params = list(model.parameters())
    average = WeightAverage(model, params, 0.5)
    with torch.no_grad():
        for p in params:
            p.mul_(3.0)
    own = [p.detach().clone() for p in params]
    with average.applied():
        assert all(torch.equal(p, s) for p, s in zip(params, average.shadow))
    assert all(torch.equal(p, o) for p, o in zip(params, own))
    with pytest.raises(RuntimeError), average.applied():  # an error inside still restores the weights
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, o) for p, o in zip(params, own))


def test_only_the_trained_parameters_are_averaged_and_saved_by_name():
    model = net()
    average = WeightAverage(model, [model[0].weight], 0.9)
    assert list(average.tensors()) == ["0.weight"]
    with pytest.raises(KeyError, match="ckpt-7.*0.weight"):
        WeightAverage(model, [model[0].weight], 0.9).load({}, "ckpt-7")
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, [model[0].weight], 1.0)


def test_a_checkpoint_keeps_the_average_and_refuses_when_it_has_none(tmp_path):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, list(model.parameters()), 0.9)
    save_training_state(tmp_path / "with", model, opt, {"step": 0}, average.tensors())
    saved = load_average(tmp_path / "with")
    assert all(torch.equal(saved[k], v) for k, v in average.tensors().items())
    save_training_state(tmp_path / "without", model, opt, {"step": 0})
    with pytest.raises(CheckpointError, match="without.*train.ema"):
        load_average(tmp_path / "without")


class Crash:
    """Wraps an objective; its loss raises on call `at` (a run that dies mid-way)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("killed")
        return self.inner.loss(model, batch)


def ema_run(run_dir, crash_at: int | None = None):
    config = tiny_config(steps=30, eval_every=10, ema=0.8)
    model, objective, encoded, _ = tiny_setup(config)
    fit(model, Crash(objective, crash_at) if crash_at else objective, encoded, config.stage("cot"), run_dir, quiet=True)
    return model


def parameters(model_dir) -> dict[str, torch.Tensor]:
    return dict(load_reasoning_model(model_dir).named_parameters())


def test_best_holds_the_average_and_a_resumed_run_keeps_it(tmp_path):
    torch.set_num_threads(1)
    reference = ema_run(tmp_path / "reference")
    best = parameters(tmp_path / "reference" / "best")
    average = load_average(tmp_path / "reference" / "checkpoints" / "step-0000030")
    weights = dict(reference.named_parameters())
    assert average.keys() == best.keys() == weights.keys()
    assert all(torch.equal(best[k], v) for k, v in average.items()), "best is the average at the last step"
    assert any(not torch.equal(best[k], weights[k]) for k in average), "...not the weights training ended with"

    with pytest.raises(KeyboardInterrupt):
        ema_run(tmp_path / "run", crash_at=15)  # dies after its step-10 checkpoint
    resumed = ema_run(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["resumed_from"] for e in log if "resumed_from" in e] == [str(tmp_path / "run" / "checkpoints" / "step-0000010")]
    assert all(torch.equal(v, weights[k]) for k, v in resumed.named_parameters())
    assert all(torch.equal(v, best[k]) for k, v in parameters(tmp_path / "run" / "best").items()), \
        "the average went on from the checkpoint"


def test_a_run_is_scored_with_and_without_its_average_at_its_last_checkpoint(tmp_path, monkeypatch):
    """measure.average_worth decodes the last checkpoint's own weights and its average (each
    decode here reports a fingerprint of the weights it ran on, so the test sees which)."""
    from safetensors.torch import load_model

    from system15 import measure

    torch.set_num_threads(1)
    model = ema_run(tmp_path / "run")
    config = tiny_config(steps=30, eval_every=10, ema=0.8)
    fingerprint = "backbone.lm.transformer.wte.weight"
    monkeypatch.setattr(measure, "evaluate", lambda m, examples, **_: float(dict(m.named_parameters())[fingerprint].detach().sum()))
    monkeypatch.setattr(measure, "accuracy", lambda value: value)
    worth = measure.average_worth(config, "cot", tmp_path / "run", model, {"valid": [], "test": []})

    ckpt = tmp_path / "run" / "checkpoints" / "step-0000030"
    probe = load_reasoning_model(tmp_path / "run" / "best")  # the structure; the checkpoint's own weights next
    load_model(probe, str(ckpt / "model.safetensors"))
    own = float(dict(probe.named_parameters())[fingerprint].detach().sum())
    average = float(load_average(ckpt)[fingerprint].sum())
    assert own != average
    assert worth == {"ema": 0.8, "step": 30, "valid_own": own, "test_own": own, "valid_average": average, "test_average": average}
    off = tiny_config(steps=30, eval_every=10)
    assert measure.average_worth(off, "cot", tmp_path / "run", model, {"valid": [], "test": []}) is None
