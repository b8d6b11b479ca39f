"""Depth and step shortcuts: the per-layer router and the two adapters (docs/design.md).

At layer l and decoding step t, with input h_{l-1,t} and the previous step's state h_{l,t-1}:

    w       = R_l(h_{l-1,t})
    short   = g_l(h_{l-1,t}) + g'_l(h_{l,t-1})            # depth shortcut + step shortcut
    h_{l,t} = w * short + (1 - w) * f_l(h_{l-1,t})          # training (soft mix)
    h_{l,t} = short if w > lambda_depth else f_l(...)      # inference (hard choice, f_l skipped)

R_l is a small MLP ending in a sigmoid; g_l and g'_l are bottleneck adapters (norm, down,
GELU, up). They are stored the way they are cheapest to run, which matters because at batch
1 a skipped layer costs per-call overhead, not arithmetic, and must be far cheaper than the
layer it replaces:
- R_l and g_l both read h_{l-1,t}, so they share one LayerNorm and one down-projection
  (`read_in`, whose outputs are R_l's hidden units, then g_l's bottleneck). A LayerNorm's
  scale and shift feed straight into a linear map, which can absorb them, so sharing the
  norm loses nothing.
- g_l and g'_l add their outputs, so their up-projections are one matrix (`write`) over the
  two bottlenecks side by side; their two biases would only ever be summed.
- GELU is the tanh form (GPT-2's own), a fifth of the exact one's cost on CPU.

g_l is residual (it starts as the identity: a skipped layer passes its input through) and
`write` starts at zero, so a fresh shortcut equals "skip the layer". Routers start closed
(w ~ 0.12) so stage 2 begins close to the full path it distils.

Inference goes one step further (`Shortcuts.folded`): each LayerNorm's scale and shift are
folded into the matrix after it, R_l's score and g_l's up-projection read the whole `read_in`
output (zero weights over the other's units) so nothing is sliced, and the decision compares
R_l's logit with logit(lambda_depth), so no sigmoid runs. A routed layer then costs five
tensor operations for the decision and six more where it is skipped. Given the backbone
(GPT-2, whose input norm is a LayerNorm like norm_in), the fold also carries the layer's K/V
projection with that norm folded in, so the kv_policy "fill" of a skipped layer is one
product over the input the decision already normalised.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _norm(norm: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _gelu_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, linear.weight, linear.bias), approximate="tanh")


class LayerShortcut(nn.Module):
    """Router R_l and shortcut branch g_l + g'_l of one layer.

    Submodules are called through `torch.nn.functional`, not as modules, to save the
    per-call overhead that dominates at batch 1."""

    def __init__(self, width: int, bottleneck: int, router_hidden: int, router_bias: float = -2.0):
        super().__init__()
        self.router_hidden = router_hidden
        self.norm_in = nn.LayerNorm(width)
        self.read_in = nn.Linear(width, router_hidden + bottleneck)  # R_l hidden | g_l bottleneck
        self.score = nn.Linear(router_hidden, 1)                     # R_l output, before the sigmoid
        self.norm_prev = nn.LayerNorm(width)
        self.read_prev = nn.Linear(width, bottleneck)                # g'_l bottleneck
        self.write = nn.Linear(2 * bottleneck, width)                # up-projections of g_l and g'_l
        for layer, bias in ((self.score, router_bias), (self.write, 0.0)):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def route(self, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w = R_l(h_{l-1,t}) ([..., 1]), and g_l's bottleneck activations for `branch`."""
        hidden = _gelu_linear(self.read_in, _norm(self.norm_in, h_in))
        router, depth = hidden[..., : self.router_hidden], hidden[..., self.router_hidden:]
        return torch.sigmoid(F.linear(router, self.score.weight, self.score.bias)), depth

    def step(self, h_prev: torch.Tensor) -> torch.Tensor:
        """g'_l's bottleneck activations for the previous step's state h_{l,t-1}."""
        return _gelu_linear(self.read_prev, _norm(self.norm_prev, h_prev))

    def branch(self, h_in: torch.Tensor, depth: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """g_l(h_{l-1,t}) + g'_l(h_{l,t-1}), with g_l's bottleneck `depth` from `route`."""
        return h_in + F.linear(torch.cat([depth, self.step(h_prev)], -1), self.write.weight, self.write.bias)

    def mix(self, w: torch.Tensor, short: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """The soft mix used in training; w = 0 gives exactly the full layer."""
        return w * short + (1 - w) * full

    def router_modules(self) -> list[nn.Module]:
        """What runs for the decision at every routed layer (for FLOP counting)."""
        return [self.read_in, self.score]

    def adapter_modules(self) -> list[nn.Module]:
        """What runs only where the layer is skipped (for FLOP counting)."""
        return [self.read_prev, self.write]


class FoldedShortcut(NamedTuple):
    """One layer's R_l, g_l and g'_l rearranged for the hard choice (inference only, no
    gradients): the same functions as LayerShortcut's, within float rounding, in fewer calls.
    Matrices are stored [in, out] for `torch.addmm`; inputs are [N, d] rows."""

    eps: float
    read: torch.Tensor          # [d, R+G]: norm_in's scale folded into read_in
    read_bias: torch.Tensor     # [R+G]: ... and its shift
    score: torch.Tensor         # [R+G, 1]: R_l's output weights, zero over g_l's units
    score_bias: torch.Tensor    # [1]
    prev: torch.Tensor          # [d, G]: norm_prev folded into read_prev
    prev_bias: torch.Tensor     # [G]
    write_depth: torch.Tensor   # [R+G, d]: g_l's up-projection, zero over R_l's units
    write_step: torch.Tensor    # [G, d]: g'_l's up-projection
    write_bias: torch.Tensor    # [d]
    kv: torch.Tensor | None = None       # [d, 2 H D]: the layer's own K/V projection, its input norm folded in
    kv_bias: torch.Tensor | None = None  # (GPT-2 only: Backbone.kv_projection; None elsewhere)

    def decide(self, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_in normalised, read_in's activations, R_l's logit [N, 1]); the row skips where
        logit > logit(lambda). The normalised input is what `fill` reads."""
        normed = F.layer_norm(h_in, h_in.shape[-1:], eps=self.eps)
        act = F.gelu(torch.addmm(self.read_bias, normed, self.read), approximate="tanh")
        return normed, act, torch.addmm(self.score_bias, act, self.score)

    def fill(self, normed: torch.Tensor) -> torch.Tensor:
        """The K/V columns [N, 2 H D] the layer itself would write for the input `decide`
        normalised (kv_policy "fill"), in one product; needs `kv` (GPT-2)."""
        return torch.addmm(self.kv_bias, normed, self.kv)

    def branch(self, h_in: torch.Tensor, act: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """g_l(h_{l-1,t}) + g'_l(h_{l,t-1}), with `act` from `decide`."""
        step = F.gelu(torch.addmm(self.prev_bias, F.layer_norm(h_prev, h_prev.shape[-1:], eps=self.eps), self.prev),
                      approximate="tanh")
        out = torch.addmm(self.write_bias, step, self.write_step)
        out += h_in
        return torch.addmm(out, act, self.write_depth)


def _fold_norm(norm: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(x) @ weight + bias = normalised(x) @ W + b: the norm's scale and shift moved into
    the matrix after it (`weight` [in, out], as torch.addmm reads it)."""
    return (weight * norm.weight[:, None]).contiguous(), bias + norm.bias @ weight


def _fold(sc: LayerShortcut, kv_projection=None) -> FoldedShortcut:
    """`kv_projection`: the backbone layer's (input LayerNorm, attention input projection, K/V
    columns; `Backbone.kv_projection`), folded in as `kv` when the norm normalises as norm_in
    does (same eps), so the fill shares decide's normalisation."""
    if sc.norm_in.eps != sc.norm_prev.eps:
        raise ValueError("folding needs one LayerNorm eps for both adapters")
    kv = kv_bias = None
    if kv_projection is not None and kv_projection[0].eps == sc.norm_in.eps:
        norm, proj, cols = kv_projection
        kv, kv_bias = _fold_norm(norm, proj.weight[:, cols], proj.bias[cols])  # HF Conv1D: weight is [in, out]
    read, read_bias = _fold_norm(sc.norm_in, sc.read_in.weight.t(), sc.read_in.bias)
    prev, prev_bias = _fold_norm(sc.norm_prev, sc.read_prev.weight.t(), sc.read_prev.bias)
    hidden, width = sc.router_hidden, read.shape[1]
    score = read.new_zeros(width, 1)
    score[:hidden] = sc.score.weight.t()
    w_depth, w_step = sc.write.weight.t().split([width - hidden, prev.shape[1]])
    write_depth = read.new_zeros(width, w_depth.shape[1])
    write_depth[hidden:] = w_depth
    return FoldedShortcut(sc.norm_in.eps, read, read_bias, score, sc.score.bias.clone(), prev, prev_bias,
                          write_depth, w_step.contiguous(), sc.write.bias.clone(), kv, kv_bias)


class Shortcuts(nn.Module):
    """One LayerShortcut per backbone layer."""

    def __init__(self, num_layers: int, width: int, bottleneck: int, router_hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(LayerShortcut(width, bottleneck, router_hidden) for _ in range(num_layers))
        self._folded: tuple = ((), [])
        self._watched: tuple = (object(), [], [])  # (backbone, its K/V projections, every tensor a fold reads)

    def __getitem__(self, i: int) -> LayerShortcut:
        return self.layers[i]

    @torch.no_grad()
    def folded(self, backbone=None) -> list[FoldedShortcut]:
        """Every layer's FoldedShortcut, rebuilt only when a parameter it reads has changed
        since (an optimizer step, a load, a move to another device). With `backbone`, each
        also carries its layer's K/V projection where that folds (`Backbone.kv_projection`).
        The parameters it reads are listed once per backbone (loads and moves change their
        data and version, not the objects), so the check costs a pass over a list."""
        if self._watched[0] is not backbone:
            projections = [None] * len(self.layers) if backbone is None else [backbone.kv_projection(i) for i in range(len(self.layers))]
            sources = [*self.parameters(), *(p for proj in projections if proj is not None for m in proj[:2] for p in m.parameters())]
            self._watched = (backbone, projections, sources)
        _, projections, sources = self._watched
        key = tuple((p.data_ptr(), p._version) for p in sources)
        if key != self._folded[0]:
            self._folded = (key, [_fold(sc, proj) for sc, proj in zip(self.layers, projections)])
        return self._folded[1]


def compute_cost_weights(critical: torch.Tensor, num_layers: int, e_noncritical: float, e_critical: float) -> torch.Tensor:
    """e_{l,t} of the stage-2 compute cost, for steps labelled `critical` ([B, T] bool).

    Non-critical steps: e = e_nc * (1 + d), growing from e_nc at layer 1 to 2 e_nc at layer L.
    Critical steps:     e = e_c  * (1 - d/2), shrinking from e_c at layer 1 to e_c/2 at layer L.
    (d = (l-1)/(L-1), the relative depth.) Returns [B, T, L]."""
    depth = torch.linspace(0, 1, num_layers, device=critical.device) if num_layers > 1 else torch.zeros(1, device=critical.device)
    noncrit = e_noncritical * (1 + depth)
    crit = e_critical * (1 - depth / 2)
    return torch.where(critical[..., None], crit, noncrit)
