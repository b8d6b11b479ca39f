"""Baselines on the same backbone and loop: pause tokens and the Coconut curriculum."""

from __future__ import annotations

import torch

from ..backbone import positions_from_mask
from .objective import Objective, example_nll, scalars, thought_batch, thought_forward


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
        return nll, scalars(nll=nll)


class Coconut(Objective):
    """Coconut's curriculum (Hao et al. 2024; docs/baselines.md compares it line by line with the
    official code): at stage s <= S (S = `coconut_stages`, the official max_latent_stage) the
    first s reasoning steps are replaced by s*c continuous thoughts (the last hidden state fed
    back as the next input); a final stage S+1 replaces every step by S*c thoughts (the
    official pad_latent_to_max), so the model ends with c*S thoughts and no language chain.
    Each stage spans `coconut_stage_steps` optimizer steps (the final one the rest), or, at 0,
    an equal share of the run; a fresh optimizer starts each stage (`coconut_reset: stage`).
    The loss covers what follows the thoughts: the remaining steps and the answer (`<eot>` is
    fed, not predicted; the question and the thoughts carry no labels). Only a model in the
    final stage may be kept as best on validation. Starts from the CoT checkpoint."""

    name = "coconut"
    thought = "hidden"
    settings = ("baselines.coconut_c", "baselines.coconut_stages", "baselines.coconut_stage_steps",
                "baselines.coconut_reset")

    def __init__(self, config):
        b = config.baselines
        self.c, self.stages = b.coconut_c, b.coconut_stages
        self.stage_steps, self.reset = b.coconut_stage_steps, b.coconut_reset
        self.stage = 1

    @property
    def final(self) -> int:
        """The last stage: every reasoning step replaced."""
        return self.stages + 1

    def eval_K(self, config):
        return self.c * self.stages

    def on_step(self, step, total):
        if self._stage_at(total - 1, total) != self.final:  # no model could ever be kept as best
            raise ValueError(f"stages.coconut.steps={total} never reaches Coconut's final stage {self.final}: "
                             f"give it more steps, or fewer baselines.coconut_stages / coconut_stage_steps")
        self.stage = self._stage_at(step, total)

    def _stage_at(self, step, total):
        if self.stage_steps:
            return min(self.final, 1 + step // self.stage_steps)
        return min(self.final, 1 + step * self.final // max(total, 1))

    def resets_optimizer(self, step, total):
        """A fresh optimizer at the first step of every stage after the first."""
        return self.reset == "stage" and step > 0 and self._stage_at(step, total) != self._stage_at(step - 1, total)

    def selectable(self, step, total):
        """Only a model that has finished the curriculum (all steps replaced) is Coconut."""
        return self._stage_at(step - 1, total) == self.final

    def _tail(self, e):
        remaining = [] if self.stage >= self.final else [i for step in e.steps[self.stage:] for i in step]
        return remaining + e.answer

    def collate(self, model, examples):
        batch = thought_batch(model, examples, [self._tail(e) for e in examples])
        batch["K"] = self.c * min(self.stage, self.stages)
        return batch

    def loss(self, model, batch):
        nll = thought_forward(model, batch, batch["K"]).nll
        return nll, {**scalars(nll=nll), "stage": self.stage}
