"""Baselines on the same backbone and loop: pause tokens and the Coconut curriculum."""

from __future__ import annotations

from .objective import Objective, thought_batch, thought_forward


class Pause(Objective):
    """K learned pause embeddings between question and answer; no feedback, no teacher."""

    name = "pause"
    thought = "pause"
    settings = ("latent.pause_K",)

    def __init__(self, config):
        self.K = config.latent.pause_K

    def eval_K(self, config):
        return self.K

    def collate(self, model, examples):
        return thought_batch(model, examples, [e.answer for e in examples])

    def loss(self, model, batch):
        nll = thought_forward(model, batch, self.K).nll
        return nll, {"nll": nll.item()}


class Coconut(Objective):
    """Coconut's curriculum: at stage s the first s reasoning steps are replaced by s*c
    continuous thoughts (the last hidden state fed back as the next input); at the last
    stage every step is replaced. Starts from the CoT checkpoint."""

    name = "coconut"
    thought = "hidden"
    settings = ("latent.coconut_c", "latent.coconut_stages")

    def __init__(self, config):
        self.c, self.stages = config.latent.coconut_c, config.latent.coconut_stages
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
