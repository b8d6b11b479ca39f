"""Depth and step shortcuts: the per-layer router and the two adapters (method.md).

At layer l and decoding step t, with input h_{l-1,t} and the previous step's state h_{l,t-1}:

    w       = R_l(h_{l-1,t})
    short   = g_l(h_{l-1,t}) + g'_l(h_{l,t-1})            # depth shortcut + step shortcut
    h_{l,t} = w * short + (1 - w) * f_l(h_{l-1,t})          # training (soft mix)
    h_{l,t} = short if w > lambda_depth else f_l(...)      # inference (hard choice, f_l skipped)

g_l starts as the identity (a skipped residual layer passes its input through) and g'_l
starts at zero, so a fresh shortcut equals "skip the layer". Routers start closed (w ~ 0.12)
so stage 2 begins close to the full path it distils.
"""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """R_l: a small MLP ending in a sigmoid; one score per position."""

    def __init__(self, width: int, hidden: int, init_bias: float = -2.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(h))  # [..., 1]


class Adapter(nn.Module):
    """Bottleneck MLP (norm, down, GELU, up), up-projection zero-initialised."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(self.norm(h))))


class LayerShortcut(nn.Module):
    """Router and shortcut branch of one layer."""

    def __init__(self, width: int, bottleneck: int, router_hidden: int):
        super().__init__()
        self.router = Router(width, router_hidden)
        self.vertical = Adapter(width, bottleneck)    # g_l: depth shortcut, same step
        self.horizontal = Adapter(width, bottleneck)  # g'_l: step shortcut, previous step

    def branch(self, h_in: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """g_l(h_{l-1,t}) + g'_l(h_{l,t-1}); g_l is residual so it starts as the identity."""
        return h_in + self.vertical(h_in) + self.horizontal(h_prev)

    def mix(self, w: torch.Tensor, h_in: torch.Tensor, h_prev: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """The soft mix used in training; w = 0 gives exactly the full layer."""
        return w * self.branch(h_in, h_prev) + (1 - w) * full


class Shortcuts(nn.Module):
    """One LayerShortcut per backbone layer."""

    def __init__(self, num_layers: int, width: int, bottleneck: int, router_hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(LayerShortcut(width, bottleneck, router_hidden) for _ in range(num_layers))

    def __getitem__(self, i: int) -> LayerShortcut:
        return self.layers[i]


def compute_cost_weights(critical: torch.Tensor, num_layers: int, e_noncritical: float, e_critical: float) -> torch.Tensor:
    """e_{l,t} of the stage-2 compute cost, for steps labelled `critical` ([B, T] bool).

    Non-critical steps: e = e_nc * (1 + d), growing from e_nc at layer 1 to 2 e_nc at layer L.
    Critical steps:     e = e_c  * (1 - d/2), shrinking from e_c at layer 1 to e_c/2 at layer L.
    (d = (l-1)/(L-1), the relative depth.) Returns [B, T, L]."""
    depth = torch.linspace(0, 1, num_layers, device=critical.device) if num_layers > 1 else torch.zeros(1, device=critical.device)
    noncrit = e_noncritical * (1 + depth)
    crit = e_critical * (1 - depth / 2)
    return torch.where(critical[..., None], crit, noncrit)
