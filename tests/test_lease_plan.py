"""recipes/gsm8k_gpu/plan.py fits the GSM8K ladder into one GPU window from measured costs.
A break in it costs a window, so its arithmetic is checked here, on costs of the size an H100
showed (results/gsm8k_smollm2/README.md): the plan must load as overrides, keep the measuring
inside the window, follow the clock, compile only where it pays, and let Coconut finish its
curriculum."""

import importlib.util
import math
import sys

import pytest

from system15.config import load_config
from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("gsm8k_gpu_plan", ROOT / "recipes" / "gsm8k_gpu" / "plan.py")
plan = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(plan)

H100 = plan.Costs(step_seconds={"cot": 0.70, "nocot": 0.25, "latent": 1.7, "system15": 1.8},
                  batch={"cot": 128, "nocot": 128, "latent": 48, "system15": 48},
                  decode_step_seconds={1: 0.048, 256: 0.065}, load_seconds=8.0, checkpoint_seconds=4.0,
                  warmup_seconds={"cot": 3.0, "nocot": 2.0, "latent": 5.0, "system15": 5.0})
WORK = plan.Work(n_train=6973, n_valid=500, n_test=1319, eval_batch=256, max_new_tokens=128)


def test_the_plan_fills_the_window_and_no_more():
    p = plan.plan(H100, WORK, 520.0, 520.0, plan.CORE)
    assert p["fits"] and set(p["rungs"]) == set(plan.CORE)
    training = sum(r["seconds"] for r in p["rungs"].values())
    assert training <= p["train_seconds"] + 1e-6
    assert p["fixed_seconds"] + training <= 520.0
    assert p["train_seconds"] > 0.2 * 520
    cot, latent = p["rungs"]["cot"], p["rungs"]["latent"]
    # its share of the training seconds in whole steps (train_seconds is rounded to 0.1 s)
    assert cot["steps"] == pytest.approx(p["train_seconds"] * plan.SHARE["cot"] / 1.0 / H100.step_seconds["cot"], abs=1)
    assert latent["batch_size"] == 48 and latent["eval_every"] == math.ceil(latent["steps"] / 2)
    assert p["rungs"]["nocot"]["eval_every"] == p["rungs"]["nocot"]["steps"], "a short rung validates once, at its end"


def test_each_rung_is_ended_by_the_clock_with_its_rate_annealed_but_coconut():
    p = plan.plan(H100, WORK, 400.0, 520.0, ("latent", "system15", "pause", "coconut"))
    for method, rung in p["rungs"].items():
        if method == "coconut":  # a clock-stopped curriculum has no finished model to keep
            assert rung["max_minutes"] is None and rung["decay_by"] == "steps"
        else:
            assert rung["decay_by"] == "budget" and 60 * rung["max_minutes"] > rung["seconds"]


def test_a_late_rung_gets_what_is_left():
    early = plan.plan(H100, WORK, 450.0, 520.0, ("latent", "system15"))
    late = plan.plan(H100, WORK, 400.0, 520.0, ("latent", "system15"))
    assert late["rungs"]["latent"]["steps"] < early["rungs"]["latent"]["steps"]
    hopeless = plan.plan(H100, WORK, 30.0, 520.0, ("latent", "system15"))
    assert not hopeless["fits"] and all(r["steps"] == plan.MIN_STEPS for r in hopeless["rungs"].values())


def test_steps_never_exceed_the_epoch_cap():
    fast = plan.Costs(**{**H100.__dict__, "step_seconds": {m: 1e-3 for m in H100.step_seconds}})
    rung = plan.plan(fast, WORK, 520.0, 520.0, plan.CORE)["rungs"]["cot"]
    assert rung["steps"] == int(plan.MAX_EPOCHS * WORK.n_train / 128)


@pytest.mark.parametrize("compile_seconds, expected", [(0.0, True), (400.0, False)])
def test_a_rung_compiles_only_where_the_compiling_pays(compile_seconds, expected):
    costs = plan.Costs(**{**H100.__dict__, "compiled_step_seconds": {"cot": 0.2}, "compile_seconds": {"cot": compile_seconds}})
    rung = plan.plan(costs, WORK, 520.0, 520.0, plan.CORE)["rungs"]["cot"]
    assert rung["compile"] is expected
    assert not plan.plan(costs, WORK, 520.0, 520.0, plan.CORE)["rungs"]["latent"]["compile"], "only timed rungs compile"


def test_extras_run_only_when_they_fit():
    assert plan.extras_fit(H100, WORK, 10.0, 520.0) == ()
    assert plan.extras_fit(H100, WORK, 400.0, 520.0) == plan.EXTRAS


def test_decoding_cost_is_read_between_the_measured_batch_sizes():
    assert plan.decode_step(H100, 1) == 0.048 and plan.decode_step(H100, 256) == 0.065
    assert 0.048 < plan.decode_step(H100, 64) < 0.065
    assert plan.decode_step(H100, 512) == pytest.approx(0.13)


def test_the_overrides_load_into_the_recipe():
    p = plan.plan(H100, WORK, 520.0, 520.0, ("coconut", "system15"))
    for method, rung in p["rungs"].items():
        config = load_config(ROOT / "configs" / "gsm8k_gpu.yaml", plan.overrides(rung, method))
        stage = config.stage(method)
        assert (stage.steps, stage.batch_size, stage.eval_every) == (rung["steps"], rung["batch_size"], rung["eval_every"])
        assert stage.max_minutes == rung["max_minutes"] and config.compile is rung["compile"]
