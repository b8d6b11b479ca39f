"""Where and in what precision things run: one home for device placement and autocast.

On CUDA the default is bf16 autocast (weights stay fp32); on CPU everything is fp32.
"""

from __future__ import annotations

import contextlib

import torch

from .config import RunConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_for(config: RunConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    return torch.device(config.device)


def synchronize(device: torch.device | None = None) -> None:
    """Wait for the accelerator's queued work (a timer must not stop before it ends): on
    `device` when given, else on CUDA wherever it is; nothing on a CPU."""
    if device is None and torch.cuda.is_available() or device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_for(config: RunConfig) -> str:
    """'fp32', 'bf16' or 'fp16' for this run."""
    if config.precision != "auto":
        return config.precision
    return "bf16" if device_for(config).type == "cuda" else "fp32"


def autocast(config: RunConfig):
    """The autocast context for inference (a no-op in fp32)."""
    precision = precision_for(config)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_for(config).type, dtype=_DTYPES[precision])


def accelerator_for(config: RunConfig):
    from accelerate import Accelerator

    precision = precision_for(config)
    return Accelerator(cpu=device_for(config).type == "cpu", mixed_precision="no" if precision == "fp32" else precision)
