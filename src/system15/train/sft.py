"""Stage 0: supervised fine-tuning on language CoT (the teacher and baseline), and No-CoT."""

from __future__ import annotations

from ..layout import cot_target, prompt, sequence_batch
from .objective import Objective, scalars, sequence_forward


class CoTSFT(Objective):
    """Next-token loss on everything after `question <bot>`: chain, <eot>, answer."""

    name = "cot"

    def __init__(self, config):
        self.config = config

    def eval_K(self, config):
        return None

    def collate(self, model, examples):
        tok = model.tokenizer
        ids, visible, labels = sequence_batch([(prompt(tok, e), cot_target(tok, e)) for e in examples], tok.pad_id)
        return {"ids": ids, "visible": visible, "labels": labels}

    def loss(self, model, batch):
        nll, _, _ = sequence_forward(model, batch)
        return nll, scalars(nll=nll)


class NoCoTSFT(CoTSFT):
    """Answer only: `question <bot> <eot> #### answer <eos>` (the latent layout with K = 0)."""

    name = "nocot"

    def eval_K(self, config):
        return 0

    def collate(self, model, examples):
        tok = model.tokenizer
        pairs = [(prompt(tok, e) + [tok.eot_id], e.answer) for e in examples]
        ids, visible, labels = sequence_batch(pairs, tok.pad_id)
        return {"ids": ids, "visible": visible, "labels": labels}
