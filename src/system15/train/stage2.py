"""Stage 2: distil the full latent path into the shortcut path (method.md, "Stage 2").

The backbone and P are frozen; only routers and adapters train. Every decoding step (the K
latent steps, then the answer tokens by teacher forcing) runs twice from the same prefill:
once on the frozen full path (the targets) and once with the soft mix. Loss:

    L2 = sum_{l,t} ||h^mix_{l,t} - sg(h^full_{l,t})||^2       (mean over width and batch)
         + beta * NLL(answer | mixed path)
         + mu * sum_{l,t} e_{l,t} * (1 - w_{l,t})              (compute cost)

with e_{l,t} from `shortcuts.compute_cost_weights`: high and growing with depth for
non-critical steps, low and shrinking with depth for critical ones.
"""

from __future__ import annotations

import torch

from ..engine import Route, decode_step, prefill
from ..layout import answer_critical, thought_critical
from ..shortcuts import compute_cost_weights
from .objective import Objective, example_nll, thought_batch

SOFT = Route(mode="soft")


class ShortcutDistillation(Objective):
    name = "system15"
    thought = "latent"
    settings = ("latent.K", "shortcut")

    def __init__(self, config):
        self.K = config.latent.K
        self.sc = config.shortcut

    def eval_K(self, config):
        return self.K

    def prepare(self, model):
        model.thought, model.method = self.thought, self.name
        if model.shortcuts is None:
            model.add_shortcuts()
        model.requires_grad_(False)
        model.shortcuts.requires_grad_(True)

    def collate(self, model, examples):
        batch = thought_batch(model, examples, [e.answer for e in examples])
        width = batch["tail"].shape[1]
        critical = torch.zeros(len(examples), self.K + width, dtype=torch.bool)
        for row, e in enumerate(examples):
            flags = thought_critical(e, self.K) + answer_critical(e)
            critical[row, : len(flags)] = torch.tensor(flags)
        batch["critical"] = critical  # per decoding step: K thoughts, then tail positions
        return batch

    def loss(self, model, batch):
        with torch.no_grad():
            start = prefill(model, batch["ids"], batch["visible"])
            full_layers, _, _ = run_steps(model, start, batch, self.K, route=None)
        mix_layers, logits, weights = run_steps(model, start, batch, self.K, route=SOFT)

        labels = batch["labels"]
        thoughts = torch.ones(labels.shape[0], self.K, dtype=torch.bool, device=labels.device)
        step_valid = torch.cat([thoughts, batch["tail_visible"]], dim=1)  # [B, K + T_tail]
        mse = torch.stack([(m - f).pow(2).mean(-1) for m, f in zip(mix_layers, full_layers)], -1)  # [B, T, L]
        mse = (mse.sum(-1) * step_valid).sum(1).mean()
        nll = example_nll(logits, labels)
        e = compute_cost_weights(batch["critical"], model.num_layers, self.sc.cost_noncritical, self.sc.cost_critical)
        cost = ((e * (1 - weights)).sum(-1) * step_valid).sum(1).mean()
        loss = mse + self.sc.beta * nll + self.sc.mu * cost
        w_mean = (weights.mean(-1) * step_valid).sum() / step_valid.sum()
        return loss, {"mse": mse.item(), "nll": nll.item(), "cost": cost.item(), "w": w_mean.item()}


def run_steps(model, start, batch, K: int, route: Route | None):
    """K latent steps then the teacher-forced tail, one decoding step at a time.

    Returns per-step layer states as a list over layers of [B, T, d], tail logits
    [B, T_tail, V], and router weights [B, T, L] (soft route only)."""
    cache, last, prev, positions = start
    cache = cache.fork()
    route = route or Route()
    per_step, logits, weights = [], [], []
    tail = batch["tail"]
    for t in range(K + tail.shape[1]):
        x = model.thought_input(t, last) if t < K else model.backbone.embed(tail[:, t - K])
        res = decode_step(model, x, positions, cache, prev, route)
        last, prev, positions = res.hidden, res.layers, positions + 1
        per_step.append(torch.stack(res.layers, 1))  # [B, L, d]
        if res.weights is not None:
            weights.append(res.weights)
        if t >= K:
            logits.append(model.backbone.head(res.hidden))
    states = torch.stack(per_step, 1)  # [B, T, L, d]
    layers = list(states.unbind(2))
    return layers, torch.stack(logits, 1), (torch.stack(weights, 1) if weights else None)
