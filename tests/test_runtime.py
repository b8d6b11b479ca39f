"""Where things run and in what precision (runtime.py): the device a config names, the
precision "auto" picks for it, the autocast that precision means, and the accelerator sync."""

import dataclasses

import pytest
import torch

from system15.runtime import accelerator_for, autocast, device_for, precision_for, synchronize
from tests.helpers import tiny_config


def config(**changes):
    return dataclasses.replace(tiny_config(), **changes)


@pytest.fixture
def cuda(monkeypatch):
    """Pretend a CUDA device is (True) or is not (False) visible; records synchronize calls."""
    calls = []

    def visible(flag: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: flag)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
        return calls
    return visible


def test_auto_takes_cuda_where_it_is_visible_and_the_cpu_elsewhere(cuda):
    cuda(False)
    assert device_for(config(device="auto")) == torch.device("cpu")
    assert precision_for(config(device="auto")) == "fp32"
    cuda(True)
    assert device_for(config(device="auto")) == torch.device("cuda")
    assert precision_for(config(device="auto")) == "bf16"
    assert precision_for(config(device="cpu")) == "fp32"  # the device named, not the one visible


def test_cuda_asked_for_without_a_device_is_refused(cuda):
    cuda(False)
    with pytest.raises(RuntimeError, match="device=cuda but no CUDA device is visible"):
        device_for(config(device="cuda"))


def test_a_named_precision_is_kept():
    for precision in ("fp32", "bf16", "fp16"):
        assert precision_for(config(device="cpu", precision=precision)) == precision


def test_autocast_computes_in_the_precision_it_names():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(config(device="cpu", precision="fp32")):
        assert (a @ b).dtype == torch.float32
    with autocast(config(device="cpu", precision="bf16")):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside


def test_synchronize_waits_on_cuda_only(cuda):
    calls = cuda(False)
    synchronize()
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]
    cuda(True)
    synchronize()
    synchronize(torch.device("cpu"))  # a CPU device named: nothing to wait for, even with CUDA visible
    assert calls == [torch.device("cuda", 0), None]


def test_an_fp32_cpu_run_gets_a_cpu_accelerator_without_mixed_precision():
    accelerator = accelerator_for(config(device="cpu", precision="fp32"))
    assert accelerator.device == torch.device("cpu") and accelerator.mixed_precision == "no"
