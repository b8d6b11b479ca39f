"""Stage 2: distil the full latent path into the shortcut path (docs/design.md, "Stage 2").

The backbone and P are frozen; only routers and adapters train. Every decoding step (the K
latent steps, then the answer tokens by teacher forcing) runs twice from the same prefill:
once on the frozen full path (the targets) and once with the soft mix. The latent steps go
one at a time; the answer tokens go through each layer together (`tail_pass`). Loss:

    L2 = sum_{l,t} ||h^mix_{l,t} - sg(h^full_{l,t})||^2 / s_l^2   (mean over width and batch)
         + beta * NLL(answer | mixed path)
         + mu * sum_{l,t} e_{l,t} * (1 - w_{l,t})                    (compute cost)

with s_l = 1 (stage2.mse_scale "none", docs/design.md's formula) or the std of the full path's
states at layer l over the batch's steps (stop-gradient; "std"). A pretrained backbone's
states are far larger than a small one's, so with "none" the squared error swamps the compute
cost and one mu means different things on different backbones; "std" makes the error, and so
mu, independent of that scale (results/gsm8k_smollm2/README.md shows the swamping).

with e_{l,t} from `shortcuts.compute_cost_weights`: high and growing with depth for
non-critical steps, low and shrinking with depth for critical ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import Route, decode_step, prefill
from ..layout import answer_critical, thought_critical
from ..shortcuts import compute_cost_weights
from .objective import Objective, example_nll, masked_std, scalars, teacher_force, thought_batch

SOFT = Route(mode="soft")


class ShortcutDistillation(Objective):
    name = "system15"
    thought = "latent"
    settings = ("architecture.K", "architecture.adapter_dim", "architecture.router_hidden", "architecture.kv_policy", "stage2")

    def __init__(self, config):
        self.K = config.architecture.K
        self.sc = config.stage2

    def eval_K(self, config):
        return self.K

    def prepare(self, model):
        self.label(model)
        if model.shortcuts is None:
            model.add_shortcuts()
        model.requires_grad_(False)
        model.shortcuts.requires_grad_(True)

    def replaces_best(self, score, best):
        """Ties go to the later checkpoint: validation scores accuracy alone, and a later
        checkpoint's routers have trained longer under the compute cost, so at equal accuracy
        it skips more (one validation question is 0.5 points on the demo)."""
        return score >= best

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
        mse = (layer_mse(mix_layers, full_layers, step_valid, self.sc.mse_scale).sum(-1) * step_valid).sum(1).mean()
        nll = example_nll(logits, labels)
        e = compute_cost_weights(batch["critical"], model.num_layers, self.sc.cost_noncritical, self.sc.cost_critical)
        cost = ((e * (1 - weights)).sum(-1) * step_valid).sum(1).mean()
        loss = mse + self.sc.beta * nll + self.sc.mu * cost
        w_mean = (weights.mean(-1) * step_valid).sum() / step_valid.sum()
        return loss, scalars(mse=mse, nll=nll, cost=cost, w=w_mean)


def layer_mse(mix_layers, full_layers, step_valid: torch.Tensor, scale: str) -> torch.Tensor:
    """Squared error per example, step and layer [B, T, L] (mean over width), each layer's
    difference divided by the full path's std at that layer over the valid steps when `scale`
    is "std" (see the module's L2)."""
    out = []
    for mix, full in zip(mix_layers, full_layers):
        diff = mix - full
        if scale == "std":
            diff = diff / masked_std(full, step_valid)
        out.append(diff.pow(2).mean(-1))
    return torch.stack(out, -1)


def run_steps(model, start, batch, K: int, route: Route | None):
    """K latent steps, one decoding step at a time, then the teacher-forced tail (`tail_pass`).

    Returns per-step layer states as a list over layers of [B, K + T_tail, d], tail logits
    [B, T_tail, V], and router weights [B, K + T_tail, L] (soft route only)."""
    cache, last, prev, positions = start
    cache = cache.fork()
    route = route or Route()
    per_step, weights = [], []
    for t in range(K):
        res = decode_step(model, model.thought_input(t, last), positions, cache, prev, route)
        last, prev, positions = res.hidden, res.layers, positions + 1
        per_step.append(torch.stack(res.layers, 1))  # [B, L, d]
        weights.append(res.weights)
    final, layers, tail_weights = tail_pass(model, batch["tail"], positions, cache, prev, route)
    if K:
        thoughts = torch.stack(per_step, 2)  # [B, L, K, d]
        layers = [torch.cat([thoughts[:, layer], tail], 1) for layer, tail in enumerate(layers)]
        if tail_weights is not None:
            tail_weights = torch.cat([torch.stack(weights, 1), tail_weights], 1)
    return layers, model.backbone.head(final), tail_weights


def tail_pass(model, ids: torch.Tensor, positions: torch.Tensor, cache, prev: list[torch.Tensor], route: Route):
    """The teacher-forced tail [B, T] after the latent steps: the same function as decoding
    it one step at a time, in one pass per layer. f_l, R_l and g_l read h_{l-1,t} and see
    every tail position at once; only g'_l, which reads the same layer's state one step back
    (h_{l,t-1}), runs position by position, over a precomputed rest:

        h_{l,t} = w_t * (h_{l-1,t} + W_g g_l + W_g' g'_l(h_{l,t-1}) + b) + (1 - w_t) * f_l
                = rest_t + w_t * W_g' g'_l(h_{l,t-1})

    Like a decoding step, every tail position is visible to attention (padding only ever
    follows the answer). Returns the final normed states [B, T, d], each layer's states
    [B, T, d] and, on the soft route, router weights [B, T, L]."""
    soft = model.shortcuts is not None and route.mode == "soft"
    weights = []

    def mix(layer, h, full):
        sc = model.shortcuts.layers[layer]
        w, depth = sc.route(h)
        w_depth, w_step = sc.write.weight.split(depth.shape[-1], dim=1)
        rest = sc.mix(w, h + F.linear(depth, w_depth, sc.write.bias), full)
        out, last = [], prev[layer]
        for t in range(ids.shape[1]):
            last = rest[:, t] + w[:, t] * F.linear(sc.step(last), w_step)
            out.append(last)
        weights.append(w[..., 0])
        return torch.stack(out, 1)

    final, states = teacher_force(model, cache, positions, ids, torch.ones_like(ids, dtype=torch.bool),
                                  keep_layers=True, after_layer=mix if soft else None)
    return final, states, torch.stack(weights, -1) if soft else None
