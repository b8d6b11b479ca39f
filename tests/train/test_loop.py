"""The training loop (train/loop.py). The step is compile-friendly: every objective's forward
and loss is one graph (no host sync inside it), the compiled step gives the eager step's
losses, and done.json records the throughput. The learning-rate schedule: warm-up, then a
cosine or linear decay over the steps, or over the wall-clock budget with `decay_by: budget`
(a run the clock stops must still end annealed). The check for a non-finite loss, read every
few steps instead of every step, is tests/test_hygiene.py's."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch

from system15.config import ConfigError, TrainConfig
from system15.data import SyntheticTask
from system15.train import loop, objective_for
from system15.train.loop import batch_tokens, fit, learning_rate
from system15.train.objective import metrics_on_device, scalars
from tests.helpers import encoded, tiny_config, tiny_model
from tests.helpers.tiny_run import tiny_config as run_config
from tests.helpers.tiny_run import tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")

# every objective, with the settings the GSM8K recipes train it with
CASES = {"cot": {}, "nocot": {}, "pause": {}, "coconut": {},
         "latent": {"stage1.probe": 1.0, "stage1.probe_results": "last"},
         "latent-taught-half": {"stage1.teacher_rows": 0.5},
         "system15": {"stage2.mse_scale": "std"}}


@pytest.fixture(scope="module")
def examples():
    return SyntheticTask(n_steps=3).generate(8, seed=1)


@pytest.mark.parametrize("case", CASES)
def test_every_objectives_step_is_one_graph(case, examples):
    """fullgraph=True fails on any graph break: a host read (.item(), a boolean index, a
    data-dependent shape) inside the step would be one. aot_eager traces forward and backward
    as inductor would, without generating code (which takes a minute here); static shapes
    trace four times faster than `fit`'s dynamic ones, and break where they do."""
    method, overrides = case.split("-")[0], {"backbone.n_layer": 1, **CASES[case]}  # tracing time grows with layers
    config = tiny_config("llama", **overrides)
    model = tiny_model(examples, "llama", shortcuts=method == "system15", **overrides)
    objective = objective_for(method, config)
    objective.prepare(model)
    model.train()
    batch = objective.collate(model, encoded(model, examples[:5]))
    with metrics_on_device():
        eager, eager_terms = model(objective, batch)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
        loss, terms = compiled(objective, batch)
        loss.backward()
    torch.testing.assert_close(loss, eager)
    assert terms.keys() == eager_terms.keys()
    assert all(torch.is_tensor(v) for k, v in terms.items() if k != "stage"), "terms must stay on the device"


def test_loss_terms_are_floats_outside_the_loop():
    t = torch.tensor(2.5, requires_grad=True) * 2
    assert scalars(nll=t) == {"nll": 5.0}
    with metrics_on_device():
        kept = scalars(nll=t)["nll"]
    assert torch.is_tensor(kept) and not kept.requires_grad


def run_losses(tmp_path, name: str, compile: bool, steps: int = 6) -> tuple[list[float], dict]:
    config = run_config(steps=steps, eval_every=steps)
    model, objective, train, _ = tiny_setup(config)
    done = fit(model, objective, train, config.stage("cot"), tmp_path / name, quiet=True, compile=compile)
    entries = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in entries if "loss" in e], done


def test_compiled_and_eager_steps_give_the_same_losses_aot_eager(tmp_path, monkeypatch):
    """Graph capture and autograd's tracing through the real `fit`: the same kernels run, so
    the same losses to the bit."""
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "aot_eager")
    eager, _ = run_losses(tmp_path, "eager", False)
    compiled, done = run_losses(tmp_path, "compiled", True)
    assert compiled == eager and done["compiled"] is True


@pytest.mark.slow
def test_compiled_and_eager_steps_give_the_same_losses_inductor(tmp_path):
    """inductor, the backend a GPU run compiles with, generating C++ here (a minute of gcc
    on two cores, so marked slow): its kernels sum in other orders, so the losses agree to
    float rounding, not to the bit."""
    assert loop.COMPILE_BACKEND == "inductor"
    eager, _ = run_losses(tmp_path, "eager", False)
    compiled, _ = run_losses(tmp_path, "compiled", True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)


def test_done_json_records_the_throughput(tmp_path):
    losses, done = run_losses(tmp_path, "run", False, steps=4)
    saved = json.loads((tmp_path / "run" / "done.json").read_text())
    assert saved == done and len(losses) == 4
    assert done["train_tokens"] > 0 and done["tokens_per_second"] > 0 and done["model_flops_per_token"] > 0
    assert done["mfu"] is None, "no peak is known for a CPU"
    assert 0 < done["train_seconds_without_validation"] <= done["seconds"] + 1e-3
    entries = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "tokens_per_second" in [e for e in entries if "loss" in e][-1], "each check logs its window's rate"


def test_losses_are_read_at_checks_not_every_step(tmp_path, monkeypatch):
    """Between checks nothing reads a loss: the log gets each window's entries at once."""
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or real(self))
    monkeypatch.setattr(loop, "LOG_EVERY", 3)
    losses, _ = run_losses(tmp_path, "run", False, steps=7)
    assert len(losses) == 7
    reads = [shape for shape in reads if len(shape) == 2]  # [steps since the check, values]
    assert [shape[0] for shape in reads] == [3, 3, 1]


def test_batch_tokens_counts_every_visible_mask():
    batch = {"ids": torch.zeros(2, 3), "visible": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
             "teacher": {"visible": torch.ones(2, 4, dtype=torch.bool)}, "K": 2,
             "probes": [{"visible": torch.ones(1, 2, dtype=torch.bool)}, {"tail_labels": torch.zeros(2)}]}
    assert batch_tokens(batch) == 5 + 8 + 2


def test_peak_flops_is_known_only_for_listed_gpus_in_half_precision():
    assert loop.peak_flops(torch.device("cpu"), "bf16") is None


# -- the learning-rate schedule --------------------------------------------------------------

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
    config = run_config(steps=40, eval_every=40)
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
