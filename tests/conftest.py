"""Shared fixtures: synthetic examples, one torch thread, both backbone families, and the
ladder in miniature (trained once per session, read by the rung, measure and recipe tests).
What they build from lives in tests/helpers."""

from __future__ import annotations

import pytest
import torch

from system15.config import METHODS
from system15.data import SyntheticTask
from system15.recipes.ladder import run_ladder
from tests.helpers import tiny_config


@pytest.fixture(scope="session")
def examples():
    return SyntheticTask(n_steps=3).generate(12, seed=1)


@pytest.fixture
def one_thread():
    """One torch thread for the test (bitwise-comparable runs); the suite's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    return request.param


# -- the ladder in miniature ----------------------------------------------------------------

LADDER = {"task.n_train": 200, "task.n_valid": 8, "task.n_test": 12, "task.n_steps": 3, "task.max_new_tokens": 12,
          "eval.timing_examples": 4, "eval.timing_batch_sizes": "[1,4]", "eval.batch_size": 12,
          "eval.sweep_depth": "[0.5,0.9]", "eval.sweep_step": "[1,2]", "stage1.compare_align": "true",
          "baselines.coconut_stages": 2, "stage2.mu_grid": "[0.5,2]",
          **{f"stages.{m}": "{steps: 4, batch_size: 8, eval_every: 4, warmup: 1}" for m in METHODS}}


@pytest.fixture(scope="session")
def ladder(tmp_path_factory):
    """(root, config, summary) of a ladder trained under root/runs, results under root/results.
    Tests may add runs and rows beside it; one that changes a rung works on a copy."""
    root = tmp_path_factory.mktemp("ladder")
    config = tiny_config(name="tiny", **LADDER)
    summary = run_ladder(config, runs_root=root / "runs", results_root=root / "results", command="pytest")
    return root, config, summary


@pytest.fixture(scope="module")
def tiny():
    """A tiny training run's model (prepared by its objective), the objective and the encoded data."""
    from tests.helpers.tiny_run import tiny_config as run_config, tiny_setup

    torch.manual_seed(0)
    model, objective, encoded, _ = tiny_setup(run_config(steps=3, batch=4))
    objective.prepare(model)
    return model, objective, encoded
