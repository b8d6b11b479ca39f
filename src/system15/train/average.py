"""An exponential moving average of the trained weights (`train.ema`).

After every optimizer step the average moves a fraction 1 - ema of the way to the weights:
with ema = 0.99 it spans about the last hundred steps. Validation, the `best` model and
so every evaluation read the average; training steps the weights themselves. A capped
stage-1 run ends while its updates are still large (Muon's steps keep a fixed size at a given
rate), and the average smooths out the last steps' jitter, as a longer anneal would.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The average of `model`'s trainable parameters; `applied()` swaps it in for a while."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        names = {id(p): name for name, p in model.named_parameters()}
        self.decay = decay
        self.names = [names[id(p)] for p in params]
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @contextmanager
    def applied(self):
        """The model holds the average inside the block, its own weights again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in zip(self.names, self.shadow)}

    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        missing = sorted(set(self.names) - tensors.keys())
        if missing:
            raise KeyError(f"{source}: the saved average lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for name, t in zip(self.names, self.shadow):
                t.copy_(tensors[name])
