"""Shared fixtures: tiny real models (GPT-2 and Llama families) and synthetic examples."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from system15.config import load_config
from system15.data import SyntheticTask
from system15.model import build_model

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
SCRIPTS = ROOT / "tests" / "scripts"  # helpers the tests import (tiny_run, ...) and launch as processes
sys.path.insert(0, str(SCRIPTS))


def tiny_pairs(family: str = "gpt2", **overrides) -> list[str]:
    """The `key=value` settings of a tiny model, as a command line would give them."""
    pairs = [f"backbone.family={family}", "backbone.n_layer=3", "backbone.n_embd=32", "backbone.n_head=4",
             f"task.data_root={DATA_ROOT}", "architecture.adapter_dim=8", "architecture.router_hidden=8"]
    return pairs + [f"{k}={v}" for k, v in overrides.items()]


def tiny_config(family: str = "gpt2", **overrides):
    return load_config(None, tiny_pairs(family, **overrides))


@pytest.fixture(scope="session")
def examples():
    return SyntheticTask(n_steps=3).generate(12, seed=1)


def tiny_model(examples, family="gpt2", thought="latent", shortcuts=False, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    texts = [e.text for e in examples]
    model = build_model(config, texts, thought=thought)
    if shortcuts:
        model.add_shortcuts()
    return model.eval()


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
