"""The optimizers the training loop can use (`train.optimizer`).

- `adamw`: AdamW on every trainable parameter.
- `muon`: Muon on the hidden weight matrices (every Linear/Conv1D weight but the LM head:
  attention, MLP, P, the shortcut adapters), AdamW on the rest (embeddings, the head, norms,
  biases), at the stage's `lr`. Muon keeps a Nesterov momentum per matrix and steps along
  that momentum orthogonalised by a quintic Newton-Schulz iteration, which sets every
  singular value near 1: each step moves all directions of a matrix by a similar amount,
  instead of mostly the few that dominate its gradient. The step is scaled by
  0.2 * sqrt(max(rows, cols)) so its RMS matches an AdamW step's, so that `muon_lr` sits in
  AdamW's range (Liu et al. 2025, "Muon is scalable for LLM training").
  GPT-2 keeps the query, key and value projections side by side in one matrix (`c_attn`,
  d x 3d). With `muon_qkv: split` each of the three blocks is orthogonalised on its own, so
  each gets a full-rank step of its own, as Llama's separate q/k/v matrices do; `fused`
  treats the three as one matrix.

Both live in one `torch.optim.Optimizer`, so the loop's schedule, checkpoints and accelerate
see a single optimizer; a group with "muon": True takes Muon's rule. The iteration runs in
float32: CPUs without bfloat16 arithmetic run the usual bfloat16 iteration far slower.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, as in Keller Jordan's Muon
NS_STEPS = 5
MUON_MOMENTUM = 0.95
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def orthogonalise(update: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximation of U V^T for update = U S V^T (singular values land in about 0.7..1.2)."""
    a, b, c = NS_COEFFICIENTS
    tall = update.shape[0] > update.shape[1]
    x = update.T if tall else update  # iterate on the short side's Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked "muon": True, AdamW on the others; decoupled weight decay on both.
    A Muon group with "blocks": n > 1 holds matrices made of n blocks side by side along their
    last dimension (GPT-2's fused q/k/v), each orthogonalised and scaled as a matrix of its own."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float):
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * decay)
                if group["muon"]:
                    self._muon(p, lr, group.get("blocks", 1))
                else:
                    self._adamw(p, lr)
        return loss

    def _muon(self, p: torch.Tensor, lr: float, blocks: int = 1) -> None:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        momentum = state["momentum"].mul_(MUON_MOMENTUM).add_(p.grad)
        nesterov = p.grad.add(momentum, alpha=MUON_MOMENTUM).float()
        for block, update in zip(p.chunk(blocks, dim=-1), nesterov.chunk(blocks, dim=-1)):
            block.add_(orthogonalise(update).to(p.dtype), alpha=-lr * 0.2 * max(update.shape) ** 0.5)

    def _adamw(self, p: torch.Tensor, lr: float) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        (beta1, beta2), grad = ADAM_BETAS, p.grad
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(ADAM_EPS)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the weights Muon takes: every Linear/Conv1D weight but the output embeddings."""
    from transformers.pytorch_utils import Conv1D

    head = model.backbone.lm.get_output_embeddings()
    head_weight = id(head.weight) if head is not None else None
    return {id(m.weight) for m in model.modules()
            if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) != head_weight}


def fused_blocks(model: nn.Module) -> dict[int, int]:
    """{id of a weight: how many matrices it holds side by side}: GPT-2's c_attn holds three
    (its Conv1D weight is d x 3d, queries, keys and values along the last dimension)."""
    if model.backbone.family != "gpt2":
        return {}
    return {id(layer.attn.c_attn.weight): 3 for layer in model.backbone.layers}


def build_optimizer(model: nn.Module, groups: list[dict], cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[float]]:
    """The optimizer for an objective's parameter groups, and each optimizer group's multiplier
    of the stage's learning-rate schedule (a group's "lr_scale"; Muon's groups times muon_lr/lr)."""
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay)
        return opt, [g["lr_scale"] for g in groups]
    matrices = hidden_matrices(model)
    blocks = fused_blocks(model) if cfg.muon_qkv == "split" else {}
    kinds = [(True, 1), *((True, n) for n in sorted(set(blocks.values()))), (False, 1)]  # (muon, blocks)
    split, scales = [], []
    for g in groups:
        for muon, n in kinds:
            params = [p for p in g["params"] if (id(p) in matrices) == muon and blocks.get(id(p), 1) == n]
            if params:
                split.append({"params": params, "muon": muon, **({"blocks": n} if n > 1 else {})})
                scales.append(g["lr_scale"] * (cfg.muon_lr / cfg.lr if muon else 1.0))
    return MuonAdamW(split, lr=cfg.lr, weight_decay=cfg.weight_decay), scales
