"""System-1.5 Reasoning: a language model that reasons in latent space through
depth shortcuts (skip a layer for an adapter) and step shortcuts (reuse the previous
step's state at the same layer).

The Python API: `load` a model folder and `answer`, or `fit` a rung (system15.api)."""

from .version import __version__

_API = ("load", "fit", "load_config")


def __getattr__(name: str):
    # imported on first use, so that `system15.data` stays usable without torch
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'system15' has no attribute {name!r}")


__all__ = ["__version__", *_API]
