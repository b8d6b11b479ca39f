"""What every training method provides to the loop, and the pieces they share.

The methods (sft, stage1, stage2, baselines) import this module, never the reverse: the
table of methods by name lives in the package (`system15.train.objective_class`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import KVCache, positions_from_mask
from ..engine import decode_step, prefill
from ..layout import IGNORE, Encoded, pad, prompt, sequence_batch


class Objective:
    """A training method: which parameters train, how a batch is built, and its loss."""

    name = "?"
    thought: str | None = None  # what the model's thought steps read (model.thought)
    # The config keys this method's training reads besides the task, the backbone and its
    # own `stages` entry (a section name stands for all its keys). A finished run is reused
    # only if these match (see `system15.rungs`).
    settings: tuple[str, ...] = ()

    def eval_K(self, config) -> int | None:
        """K for generation: None = token mode (CoT)."""
        return 0

    def label(self, model) -> None:
        """Write into the model's spec what these weights are: the method, what a thought
        step reads, and the K they answer with by default."""
        model.method, model.thought, model.spec.K = self.name, self.thought, self.eval_K(None)

    def prepare(self, model) -> None:
        """Label the model (`label`) and set which parameters train (default: backbone + P + pause)."""
        self.label(model)
        for p in model.parameters():
            p.requires_grad_(True)
        if model.shortcuts is not None:
            model.shortcuts.requires_grad_(False)

    def param_groups(self, model) -> list[dict]:
        """The optimizer's parameter groups (after `prepare`); a group's "lr_scale"
        multiplies the stage's learning rate (default: one group, every trainable parameter)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def on_step(self, step: int, total: int) -> None:
        """Hook for curricula (Coconut)."""

    def resets_optimizer(self, step: int, total: int) -> bool:
        """Start a fresh optimizer (its state cleared) before `step`? (A curriculum: at a stage boundary.)"""
        return False

    def selectable(self, step: int, total: int) -> bool:
        """May the model at `step` be kept as best? (A curriculum: only in its final stage.)"""
        return True

    def replaces_best(self, score: float, best: float) -> bool:
        """Does a checkpoint scoring `score` on validation replace the kept one? (Default: only a
        higher score, so ties keep the earlier checkpoint.)"""
        return score > best

    def collate(self, model, examples: list[Encoded]) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


_ON_DEVICE = False  # inside the training loop: loss terms stay on the device (`metrics_on_device`)


@contextmanager
def metrics_on_device():
    """While it lasts, `scalars` keeps loss terms as detached device tensors: the training loop
    reads them on the host only at its checks, so a step forces no host sync (on a GPU, the
    host queues steps ahead of the device; a compiled step stays one graph)."""
    global _ON_DEVICE
    before, _ON_DEVICE = _ON_DEVICE, True
    try:
        yield
    finally:
        _ON_DEVICE = before


def scalars(**terms: torch.Tensor) -> dict:
    """A loss's terms for the training log: floats, or detached tensors inside `metrics_on_device`."""
    return {k: v.detach() if _ON_DEVICE else v.item() for k, v in terms.items()}


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean token NLL, so that a batch split across
    processes averages to the same value as the whole batch in one process."""
    ce = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def layer_std(states: torch.Tensor) -> torch.Tensor:
    """One standard deviation over a layer's states (stop-gradient), floored: what the
    normalised losses (stage 1's CODI-style alignment, stage 2's scaled error) divide by."""
    return states.detach().std().clamp(min=1e-6)


def masked_std(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`layer_std` of the states [..., d] where `mask` [...] is set, without gathering them
    (a boolean index has a data-dependent shape: a host sync, and a break in a compiled graph)."""
    states, weight = states.detach(), mask[..., None].to(states.dtype)
    n = weight.sum() * states.shape[-1]
    mean = (states * weight).sum() / n
    var = ((states - mean).pow(2) * weight).sum() / (n - 1).clamp(min=1)
    return var.sqrt().clamp(min=1e-6)


def sequence_forward(model, batch: dict, keep_layers: bool = False, cache: KVCache | None = None):
    """Teacher forcing over right-padded sequences (ids, visible, labels); writes `cache` when given."""
    bb = model.backbone
    final, states = bb.forward_full(bb.embed(batch["ids"]), positions_from_mask(batch["visible"]),
                                    batch["visible"], cache, keep_layers=keep_layers)
    return example_nll(bb.head(final), batch["labels"]), final, states


def prompt_prefix(cache: KVCache, final: torch.Tensor, prompt_len: torch.Tensor, width: int | None = None) -> tuple:
    """A prompt prefill, taken from a pass over right-padded `prompt + chain` (its `cache`
    and final states): the prompt tokens sit at the same positions and see only each other,
    so their keys, values and last state are exactly what the prompt alone would give.
    Returns what `engine.prefill` returns, less the per-layer states, which only shortcuts
    read: (cache, h_L of the last prompt token, None per layer, next position ids). Stage 1's
    student starts here instead of running the prompt again; the gradients of both losses
    meet in the one shared pass, as they would in two. `width`: the longest prompt, where the
    caller knows it (else read off `prompt_len`: a host sync on a GPU)."""
    width = int(prompt_len.max()) if width is None else width
    visible = torch.arange(width, device=prompt_len.device)[None] < prompt_len[:, None]
    rows = torch.arange(len(prompt_len), device=prompt_len.device)
    return (cache.prefix(width, visible), final[rows, prompt_len - 1], [None] * len(cache.keys),
            prompt_len.clone())


def prompt_pass(model, batch: dict) -> tuple:
    """`prompt_prefix` for right-padded prompts alone (ids, visible): one pass, no head."""
    bb = model.backbone
    cache = KVCache.empty(bb.num_layers)
    final, _ = bb.forward_full(bb.embed(batch["ids"]), positions_from_mask(batch["visible"]), batch["visible"], cache)
    return prompt_prefix(cache, final, batch["visible"].sum(1), width=batch["ids"].shape[1])  # padded to the longest


def join_prefixes(first: tuple, second: tuple) -> tuple:
    """Two `prompt_prefix` results, for two sets of rows, as one (rows of `first`, then `second`)."""
    cache = KVCache.stack_rows([first[0], second[0]])
    return cache, torch.cat([first[1], second[1]]), first[2], torch.cat([first[3], second[3]])


def thought_batch(model, examples: list[Encoded], tails: list[list[int]]) -> dict:
    """Left-padded prompts, then right-padded tails `<eot> targets` with their labels."""
    tok = model.tokenizer
    ids, visible = pad([prompt(tok, e) for e in examples], tok.pad_id, left=True)
    tail, tail_visible, labels = sequence_batch([([tok.eot_id], t) for t in tails], tok.pad_id)
    return {"ids": ids, "visible": visible, "tail": tail, "tail_visible": tail_visible, "labels": labels}


@dataclass
class ThoughtPass:
    nll: torch.Tensor                 # answer NLL after the thoughts
    logits: torch.Tensor              # tail logits [B, T, vocab]
    thoughts: list                    # StepResult of each thought step
    final: torch.Tensor               # tail final states [B, T, d]
    states: list | None               # tail per-layer states (keep_layers)
    forks: list                       # (cache branch, next positions) after each thought step


def thoughts_after_prompt(model, prefilled: tuple, K: int, forced: list | None = None):
    """K thought steps (full path) after a prompt prefill (`engine.prefill`, or `prompt_prefix`).
    Returns the cache, the next position ids, each step's StepResult, and a cache branch (with
    its next positions) after each step. `forced[k]`, if given and not None, is (rows [B] bool,
    states [B, d]): those rows start step k from the given state instead of step k-1's own."""
    cache, last, prev, positions = prefilled
    thoughts, forks = [], []
    for k in range(K):
        if forced is not None and forced[k] is not None:
            rows, states = forced[k]
            last = torch.where(rows[:, None], states.to(last.dtype), last)
        res = decode_step(model, model.thought_input(k, last), positions, cache, prev)
        last, prev, positions = res.hidden, res.layers, positions + 1
        thoughts.append(res)
        forks.append((cache.fork(), positions))
    return cache, positions, thoughts, forks


def thought_forward(model, batch: dict, K: int, keep_layers: bool = False, start: tuple | None = None,
                    forced: list | None = None) -> ThoughtPass:
    """Prompt prefill (or `start`, a prefill already made), K thought steps (full path;
    `forced` as in `thoughts_after_prompt`), then the tail by teacher forcing."""
    prefilled = start if start is not None else prefill(model, batch["ids"], batch["visible"])
    cache, positions, thoughts, forks = thoughts_after_prompt(model, prefilled, K, forced)
    final, states = teacher_force(model, cache, positions, batch["tail"], batch["tail_visible"], keep_layers)
    logits = model.backbone.head(final)
    return ThoughtPass(example_nll(logits, batch["labels"]), logits, thoughts, final, states, forks)


def teacher_force(model, cache, positions, ids, visible, keep_layers=False, after_layer=None):
    """Feed right-padded `ids` after what `cache` holds (positions continue per row);
    `after_layer` as in `Backbone.forward_full`."""
    bb = model.backbone
    width = ids.shape[1]
    pos = positions[:, None] + torch.arange(width, device=positions.device)[None]
    return bb.forward_full(bb.embed(ids), pos, visible, cache, keep_layers, after_layer)
