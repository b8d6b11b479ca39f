"""System-1.5 Reasoning: a language model that reasons in latent space through
depth shortcuts (skip a layer for an adapter) and step shortcuts (reuse the previous
step's state at the same layer)."""

__version__ = "0.1.0"
