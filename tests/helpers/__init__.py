"""What the tests share: paths, tiny real models (GPT-2 and Llama families) and their settings,
and how to start a helper as a process of its own.

The fixtures that build on these live in tests/conftest.py; `tiny_run` and `ddp_check` are
also run as programs (`python -m tests.helpers.tiny_run`, with `child_env()`)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from system15.config import load_config
from system15.layout import encode
from system15.model import build_model

ROOT = Path(__file__).resolve().parents[2]  # the project: src/, tests/, configs/, ...
DATA_ROOT = ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"shared data not found at {DATA_ROOT}")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that runs a helper (`python -m tests.helpers.<name>`):
    this one's, with the project on PYTHONPATH so that `tests` imports from any working directory."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def tiny_pairs(family: str = "gpt2", **overrides) -> list[str]:
    """The `key=value` settings of a tiny model, as a command line would give them."""
    pairs = [f"backbone.family={family}", "backbone.n_layer=3", "backbone.n_embd=32", "backbone.n_head=4",
             f"task.data_root={DATA_ROOT}", "architecture.adapter_dim=8", "architecture.router_hidden=8"]
    return pairs + [f"{k}={v}" for k, v in overrides.items()]


def tiny_config(family: str = "gpt2", **overrides):
    return load_config(None, tiny_pairs(family, **overrides))


def tiny_model(examples, family="gpt2", thought="latent", shortcuts=False, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    texts = [e.text for e in examples]
    model = build_model(config, texts, thought=thought)
    if shortcuts:
        model.add_shortcuts()
    return model.eval()


def encoded(model, examples):
    """`examples` in the model's token ids (layout.encode)."""
    return [encode(model.tokenizer, e) for e in examples]


def randomise_routers(model, seed=0, spread=3.0):
    """Untrained routers are closed; give them varied scores around 0.5 and non-zero adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.shortcuts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for layer in model.shortcuts.layers:
            layer.score.weight.copy_(torch.randn(layer.score.weight.shape, generator=g) * spread)
            layer.score.bias.zero_()
    return model


def write_jsonl(path: Path, examples, plain: bool = False) -> Path:
    """Examples in the documented layout: {"question", "cot", "answer"}; `plain` writes the
    steps as plain text with their labels instead of equations."""
    lines = []
    for e in examples:
        record = {"question": e.question, "answer": e.answer}
        if plain:
            record["cot"] = [f"compute {s.text[2:-2]}" for s in e.steps]
            record["critical"] = [s.critical for s in e.steps]
        else:
            record["cot"] = [s.text for s in e.steps]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


# -- damage done to files on disk ---------------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of the data (past a safetensors header), size unchanged."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] if path.suffix == ".safetensors" else 0
    data[(start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def copy_of(directory: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(directory, tmp_path / directory.name))
