"""The Python API: load a model folder and answer, or fit (train) a rung of the ladder.

    import system15
    model = system15.load("runs/demo/system15/best")
    out = model.answer(["a=6,b=6,c=a+b. c?"])
    out[0].text, out[0].value, out[0].decoding_steps, out[0].flops, out[0].routes

    config = system15.load_config("configs/demo.yaml", ["task.train=mine.jsonl", "task.name=files"])
    for method in ("cot", "latent", "system15"):      # each rung starts from the one before
        model = system15.fit(method, config, runs="runs")
    model.save("my-model")                              # a folder that loads anywhere
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import RunConfig, load_config
from .model import ReasoningModel, load_reasoning_model


def load(path: str | os.PathLike) -> ReasoningModel:
    """A saved model folder, ready to `answer`; it needs nothing but the folder."""
    return load_reasoning_model(path)


def fit(method: str, config: RunConfig | str | os.PathLike | None = None, overrides: list[str] | tuple = (),
          *, runs: str | os.PathLike = "runs") -> ReasoningModel:
    """Train one rung as the ladder does, into `runs/<config.name>/<method>/`, and return its
    best model. `config` is a RunConfig or a recipe path (plus `key=value` overrides). A rung
    starts from the rung before it (cot <- latent <- system15; pause and coconut <- cot),
    which must be trained first in the same runs folder; a finished rung is loaded, not
    trained again, and an interrupted one resumes."""
    from .data import load_splits
    from .rungs import ladder_rung
    from .runtime import device_for

    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    elif overrides:
        raise ValueError("overrides apply to a recipe path; change a RunConfig with dataclasses.replace")
    splits = load_splits(config)  # before any folder is written: bad data stops here
    model = ladder_rung(config, method, splits, Path(runs) / config.name)
    return model.to(device_for(config))
