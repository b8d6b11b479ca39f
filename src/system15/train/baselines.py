"""Baselines on the same backbone and loop: pause tokens and the Coconut curriculum."""

from __future__ import annotations

import torch

from ..backbone import positions_from_mask
from .objective import Objective, example_nll, thought_batch, thought_forward


class Pause(Objective):
    """K learned pause embeddings between question and answer; no feedback, no teacher."""

    name = "pause"
    thought = "pause"
    settings = ("baselines.pause_K",)

    def __init__(self, config):
        self.K = config.baselines.pause_K

    def eval_K(self, config):
        return self.K

    def collate(self, model, examples):
        return thought_batch(model, examples, [e.answer for e in examples])

    def loss(self, model, batch):
        """The pause inputs read no hidden state, so the prompt, the K pauses and the answer
        go through the backbone in one pass: the same function as a prefill, K decoding steps
        and teacher forcing (`thought_forward`), for one pass's cost instead of K + 2."""
        bb, ids, tail = model.backbone, batch["ids"], batch["tail"]
        prompt = bb.embed(ids)
        pauses = [model.thought_input(k, prompt[:, -1])[:, None] for k in range(self.K)]  # they ignore the state given
        embeds = torch.cat([prompt, *pauses, bb.embed(tail)], 1)
        visible = torch.cat([batch["visible"], torch.ones_like(ids[:, : self.K], dtype=torch.bool),
                             batch["tail_visible"]], 1)
        final, _ = bb.forward_full(embeds, positions_from_mask(visible), visible)
        nll = example_nll(bb.head(final[:, -tail.shape[1]:]), batch["labels"])
        return nll, {"nll": nll.item()}


class Coconut(Objective):
    """Coconut's curriculum: at stage s the first s reasoning steps are replaced by s*c
    continuous thoughts (the last hidden state fed back as the next input); at the last
    stage every step is replaced. Starts from the CoT checkpoint."""

    name = "coconut"
    thought = "hidden"
    settings = ("baselines.coconut_c", "baselines.coconut_stages")

    def __init__(self, config):
        self.c, self.stages = config.baselines.coconut_c, config.baselines.coconut_stages
        self.stage = 1

    def eval_K(self, config):
        return self.c * self.stages

    def on_step(self, step, total):
        self.stage = self._stage_at(step, total)

    def _stage_at(self, step, total):
        return min(self.stages, 1 + step * self.stages // max(total, 1))

    def selectable(self, step, total):
        """Only a model that has finished the curriculum (all steps replaced) is Coconut."""
        return self._stage_at(step - 1, total) == self.stages

    def _tail(self, e):
        remaining = [] if self.stage >= self.stages else [i for step in e.steps[self.stage:] for i in step]
        return remaining + e.answer

    def collate(self, model, examples):
        batch = thought_batch(model, examples, [self._tail(e) for e in examples])
        batch["K"] = self.c * self.stage
        return batch

    def loss(self, model, batch):
        nll = thought_forward(model, batch, batch["K"]).nll
        return nll, {"nll": nll.item(), "stage": self.stage}
