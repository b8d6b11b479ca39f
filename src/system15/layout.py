"""Examples -> token ids, in the three layouts of docs/design.md, and padding into batches.

    CoT:     question <bot> step_1 ... step_S <eot> #### answer <eos>
    latent:  question <bot> [K thought steps] <eot> #### answer <eos>
    No-CoT:  the latent layout with K = 0

Every method's prompt is `question <bot>`. Thought methods then take K thought steps and
are fed `<eot>`; CoT writes its chain and `<eot>` itself. Targets are everything the model
must produce after the prompt: for CoT the chain, `<eot>` and the answer; for the others the
answer after `<eot>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .data.records import note_operands, parse_number
from .tokenizer import Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    question: list[int]
    steps: list[list[int]]   # one id list per reasoning step
    answer: list[int]        # "#### " marker, the answer, then <eos>
    critical: list[bool]     # per reasoning step
    marker: int              # how many ids of `answer` are the "#### " marker
    results: tuple[str, ...] = ()  # per reasoning step, its result text
    operands: tuple[frozenset | None, ...] = ()  # per reasoning step, the numbers it reads (None: not a note)

    @property
    def chain(self) -> list[int]:
        return [i for step in self.steps for i in step]


def encode(tok: Tokenizer, ex: Example) -> Encoded:
    steps = [tok.encode((" " if i else "") + s.text) for i, s in enumerate(ex.steps)]
    marker = tok.encode("#### ")
    return Encoded(tok.encode(ex.question), steps, marker + tok.encode(ex.answer) + [tok.eos_id],
                   [s.critical for s in ex.steps], len(marker), tuple(s.result for s in ex.steps),
                   tuple(note_operands(s.text) for s in ex.steps))


def prompt(tok: Tokenizer, e: Encoded) -> list[int]:
    return e.question + [tok.bot_id]


def cot_target(tok: Tokenizer, e: Encoded) -> list[int]:
    return e.chain + [tok.eot_id] + e.answer


def segments(e: Encoded, K: int) -> list[range]:
    """The CoT steps latent step k of K covers, for each k: [floor((k-1)S/K), floor(kS/K))
    of the S steps (docs/design.md). A segment may be empty."""
    S = len(e.steps)
    return [range((k - 1) * S // K, k * S // K) for k in range(1, K + 1)]


def segment_ends(e: Encoded, K: int) -> list[int | None]:
    """For latent step k of K, the index within the chain of the last token of the CoT
    segment it covers (`segments`). None when the segment is empty."""
    ends, offset, cum = [], 0, []
    for step in e.steps:
        offset += len(step)
        cum.append(offset - 1)
    for seg in segments(e, K):
        ends.append(cum[seg[-1]] if seg else None)
    return ends


def answer_critical(e: Encoded) -> list[bool]:
    """Per answer id: the answer's digits are critical; the marker and <eos> are not."""
    return [False] * e.marker + [True] * (len(e.answer) - e.marker - 1) + [False]


def segment_results(e: Encoded, K: int) -> list[list[str]]:
    """The result texts of the CoT steps each of the K latent steps covers."""
    return [[e.results[i] for i in seg] for seg in segments(e, K)]


def segment_live(e: Encoded, K: int) -> list[list[str]]:
    """For latent step k of K, the results it must hand on: those of the steps up to the end of
    its segment whose values a step of a later segment reads (compared as `label_equations`
    compares them), the most recent first. The last segment hands on the answer, its last
    result; so does a segment when the later steps are not calculator notes or read none."""
    out = []
    for k, seg in enumerate(segments(e, K), start=1):
        if not seg:
            out.append([])
            continue
        hi = seg.stop
        later = list(e.operands[hi:])
        live = []
        if k < K and later and None not in later:
            read = frozenset().union(*later)
            for result in reversed(e.results[:hi]):
                value = parse_number(result)
                if value is not None and abs(value) in read and result not in live:
                    live.append(result)
        out.append(live or [e.results[hi - 1]])
    return out


def thought_critical(e: Encoded, K: int) -> list[bool]:
    """Latent step k is critical when any CoT step it covers is (docs/design.md)."""
    return [any(e.critical[i] for i in seg) for seg in segments(e, K)]


def pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and visible [B, T] (False on padding)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    visible = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        visible[row, span] = True
    return ids, visible


def sequence_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """(context, target) pairs -> right-padded ids, visible, labels (IGNORE outside targets).

    labels[b, i] is the token to predict *from* position i, so logits line up directly."""
    seqs = [c + t for c, t in pairs]
    ids, visible = pad(seqs, pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, (c, t) in enumerate(pairs):
        labels[row, len(c) - 1: len(c) + len(t) - 1] = torch.tensor(t, dtype=torch.long)
    return ids, visible, labels
