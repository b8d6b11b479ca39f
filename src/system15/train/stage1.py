"""Stage 1: language-to-latent self-distillation (docs/design.md, "Stage 1").

Teacher and student are one model (shared weights, initialised from CoT-SFT):

    L1 = NLL_teacher(CoT + answer) + NLL_student(answer | K latent steps) + alpha * align

align, rule "segment" (default): MSE between latent step k's last-layer state and the
teacher's last-layer state (stop-gradient) at the last token of the CoT segment that step k
covers. Rule "codi": every layer, at the position just before the answer, each layer's
difference divided by the teacher's standard deviation at that layer. Rule
"segment_layers" (a lever of ours): the segment rule at every layer, normalised as CODI's.
With experimental.align_scale = "dim" (another lever), the normalised rules divide each hidden
dimension by its own std over the batch instead of one std for the whole layer, so the
dimensions that tell examples apart weigh as much as those every example shares.

With stage1.teacher_rows < 1, the teacher runs on only the first rows of each batch (a random
draw, so a random share of it): its NLL and the alignment are averaged over those rows, while
the student's answer NLL and the probe still cover every row. The other rows run their prompt
alone, to give the student its prefix. The teacher's pass over prompt and chain is most of a
step's arithmetic, and its NLL stays near zero after CoT-SFT, so a smaller share buys steps.

Optional (stage1.probe > 0), one of the levers the plain rule needed at small scale: after
latent step k, a short teacher-forced branch must decode `#### <results of segment k>`, so
the latent path is made to carry the intermediate values themselves. With
stage1.probe_results = "all" the branch decodes every result of the segment in order, so a
later result may lean on the earlier ones written as tokens; with "last" it decodes only the
segment's last result, which the latent state must then hold on its own; with "live" it
decodes every result up to the segment's end that a later step reads (`layout.segment_live`),
the most recent first, so a latent state that must hand on two values is asked for both.
"""

from __future__ import annotations

import re

import torch

from ..backbone import KVCache
from ..engine import prefill
from ..layout import (IGNORE, Encoded, cot_target, pad, prompt, segment_ends, segment_live, segment_results,
                      sequence_batch)
from .objective import (Objective, example_nll, join_prefixes, layer_std, prompt_pass, prompt_prefix, scalars, sequence_forward,
                        teacher_force, thought_batch, thought_forward, thoughts_after_prompt)


class LatentDistillation(Objective):
    name = "latent"
    thought = "latent"
    settings = ("architecture.K", "stage1.alpha", "stage1.align", "experimental.align_scale", "stage1.probe", "stage1.probe_results",
                "experimental.warm_start", "experimental.teacher_inputs", "architecture.projection_hidden", "stage1.projection_lr",
                "stage1.teacher_rows", "experimental.prompt_grad")

    def __init__(self, config):
        self.K, self.alpha, self.rule = config.architecture.K, config.stage1.alpha, config.stage1.align
        self.scale = config.experimental.align_scale
        self.probe, self.probe_results = config.stage1.probe, config.stage1.probe_results
        self.warm_start, self.teacher_inputs = config.experimental.warm_start, config.experimental.teacher_inputs
        self.projection_lr = config.stage1.projection_lr
        self.teacher_rows = config.stage1.teacher_rows
        self.prompt_grad = config.experimental.prompt_grad
        self.active = self.K  # latent steps in use; fewer during the warm start

    def eval_K(self, config):
        return self.K

    def param_groups(self, model):
        """P at `stage1.projection_lr` times the stage's rate: it starts from random weights,
        the backbone from CoT-SFT's. At 1, the one group every method has."""
        if self.projection_lr == 1:
            return super().param_groups(model)
        trainable = super().param_groups(model)[0]["params"]
        own = {id(p) for p in model.projection.parameters()}
        return [{"params": [p for p in trainable if id(p) not in own], "lr_scale": 1.0},
                {"params": [p for p in trainable if id(p) in own], "lr_scale": self.projection_lr}]

    def _active_at(self, step: int, total: int) -> int:
        """Warm start (Coconut-style): over the first `warm_start` of training, latent steps
        replace the CoT segments one at a time (1, 2, ... K-1); the rest are written as text."""
        warm = int(self.warm_start * total)
        if self.K <= 1 or step >= warm:
            return self.K
        return 1 + step * (self.K - 1) // max(warm, 1)

    def on_step(self, step, total):
        self.active = self._active_at(step, total)

    def selectable(self, step, total):
        return self._active_at(step - 1, total) == self.K

    def _remaining(self, e) -> list[int]:
        """Chain ids of the segments not yet replaced by latent steps."""
        first = self.active * len(e.steps) // self.K
        return [i for step in e.steps[first:] for i in step]

    def teachers(self, batch_size: int) -> int:
        """How many rows of a batch the teacher runs on (`stage1.teacher_rows`; at least one)."""
        return max(1, round(self.teacher_rows * batch_size))

    def collate(self, model, examples):
        tok = model.tokenizer
        taught = examples[: self.teachers(len(examples))]  # the batch is a random draw: its first rows are too
        teacher_pairs = [(prompt(tok, e), cot_target(tok, e)) for e in taught]
        ids, visible, labels = sequence_batch(teacher_pairs, tok.pad_id)
        student = thought_batch(model, examples, [self._remaining(e) + e.answer for e in examples])
        seg = torch.full((len(examples), self.K), -1, dtype=torch.long)  # -1: no teacher state to align to
        for row, e in enumerate(taught):
            for k, end in enumerate(segment_ends(e, self.K)[: self.active]):
                if end is not None:
                    seg[row, k] = len(e.question) + 1 + end
        # the last marker id predicts the answer's first digit: that is "the position before the answer"
        teacher_before = torch.tensor([len(e.question) + 1 + len(e.chain) + 1 + e.marker - 1 for e in taught])
        student_before = torch.tensor([len(self._remaining(e)) + e.marker for e in taught])
        prompt_len = torch.tensor([len(pair[0]) for pair in teacher_pairs])
        batch = {"teacher": {"ids": ids, "visible": visible, "labels": labels}, "prompt_len": prompt_len,
                 "prompt_width": int(prompt_len.max()), "student": student,
                 "segment_pos": seg, "teacher_before": teacher_before, "student_before": student_before,
                 "K": self.active}
        if len(taught) < len(examples):  # the other rows' prompts, right-padded, for the student's prefix
            rest, rest_visible = pad([prompt(tok, e) for e in examples[len(taught):]], tok.pad_id)
            batch["prompts"] = {"ids": rest, "visible": rest_visible}
        if self.probe:
            asked = [self._probe_results(e) for e in examples]
            batch["probes"] = [self._probe_batch(tok, [a[k] for a in asked], k, student["labels"])
                               for k in range(self.active)]
        return batch

    def _probe_results(self, e) -> list[list[str]]:
        """Per latent step, the results its probe asks for (`stage1.probe_results`)."""
        if self.probe_results == "live":
            return segment_live(e, self.K)
        per_step = segment_results(e, self.K)
        return [results[-1:] for results in per_step] if self.probe_results == "last" else per_step

    def _probe_batch(self, tok, asked: list[list[str]], k, tail_labels):
        """`<eot> #### <results asked for after latent step k>` for each example (an empty
        segment asks for none, and gets no target).

        The branch after the last latent step starts from the cache the answer tail continues,
        and is fed the same `<eot>`. Where every example's target opens its tail's target (the
        last segment's last result is the answer), the probe's NLL is the tail's on those
        tokens, so it is read off the tail pass ("tail_labels") and needs no branch of its own."""
        targets = [tok.encode("#### " + " ".join(results)) if results else [] for results in asked]
        if k == self.active - 1 and all(tail_labels[row, : len(t)].tolist() == t for row, t in enumerate(targets)):
            labels = tail_labels.clone()
            for row, t in enumerate(targets):
                labels[row, len(t):] = IGNORE
            return {"tail_labels": labels}
        ids, visible, labels = sequence_batch([([tok.eot_id], t) for t in targets], tok.pad_id)
        return {"ids": ids, "visible": visible, "labels": labels}

    def loss(self, model, batch):
        codi = self.rule == "codi"
        teacher_cache = KVCache.empty(model.num_layers)
        t_nll, t_final, t_states = sequence_forward(model, batch["teacher"], keep_layers=self.rule != "segment",
                                                    cache=teacher_cache)
        start = prompt_prefix(teacher_cache, t_final, batch["prompt_len"], batch.get("prompt_width"))  # the student skips its own prefill
        if "prompts" in batch:  # rows without a teacher: their prompts alone
            with torch.set_grad_enabled(self.prompt_grad == "all"):
                rest = prompt_pass(model, batch["prompts"])
            start = join_prefixes(start, rest)
        forced = teacher_inputs(t_final, batch["segment_pos"], batch["K"], self.teacher_inputs) if self.teacher_inputs else None
        student = thought_forward(model, batch["student"], batch["K"], keep_layers=codi, start=start, forced=forced)
        if codi:
            taught = len(batch["teacher_before"])
            align = codi_alignment(t_states, [s[:taught] for s in student.states], batch["teacher_before"],
                                   batch["student_before"], scale=self.scale)
        elif self.rule == "segment_layers":
            align = torch.stack([segment_alignment(t_layer, [res.layers[layer] for res in student.thoughts],
                                                   batch["segment_pos"], normalise=self.scale)
                                 for layer, t_layer in enumerate(t_states)]).mean()
        else:
            align = segment_alignment(t_final, [res.hidden for res in student.thoughts], batch["segment_pos"])
        loss = t_nll + student.nll + self.alpha * align
        metrics = scalars(teacher_nll=t_nll, student_nll=student.nll, align=align)
        if self.probe:
            probe = probe_nll(model, student.forks, batch["probes"], student.logits)
            loss = loss + self.probe * probe
            metrics.update(scalars(probe_nll=probe))
        return loss, metrics


def teacher_inputs(t_final: torch.Tensor, segment_pos: torch.Tensor, K: int, chance: float) -> list:
    """Latent teacher forcing (experimental.teacher_inputs): each example's step k > 1 starts, with
    probability `chance`, from the teacher's last-layer state (stop-gradient) at the end of
    segment k-1, the state step k-1 is aligned to, instead of from step k-1's own output. Step
    k then learns its own segment from a clean start; decoding always chains its own states.
    Examples whose segment k-1 is empty, or that have no teacher (rows past `t_final`'s, see
    `stage1.teacher_rows`), keep their own state. `forced` for `thought_forward`."""
    forced = [None]
    rows = torch.arange(len(segment_pos), device=segment_pos.device).clamp(max=len(t_final) - 1)
    for k in range(1, K):
        pos = segment_pos[:, k - 1]
        drawn = torch.rand(len(pos), device=pos.device) < chance
        forced.append((drawn & (pos >= 0), t_final[rows, pos.clamp(min=0)].detach()))
    return forced


def probe_nll(model, forks, probes, tail_logits: torch.Tensor) -> torch.Tensor:
    """After latent step k, decode the results of the CoT segment k covers, from a cache branch:
    the latent path must carry the intermediate values, not just end near the teacher. A probe
    whose targets open the answer tail's is scored on the tail's logits (`_probe_batch`)."""
    losses = []
    for (cache, positions), probe in zip(forks, probes):
        if "tail_labels" in probe:
            losses.append(example_nll(tail_logits, probe["tail_labels"]))
            continue
        final, _ = teacher_force(model, cache, positions, probe["ids"], probe["visible"])
        losses.append(example_nll(model.backbone.head(final), probe["labels"]))
    return torch.stack(losses).mean()


@torch.no_grad()
def probe_readout(model, examples: list[Encoded], K: int, which: str = "first", max_tokens: int = 6) -> list[float]:
    """How far the latent chain gets: after each latent step k, branch the cache, feed `<eot>`
    and decode greedily up to `<eos>`, as decoding does; the share of examples whose first
    number after `####` is the result the probe was trained to write first: the first result
    of the segment step k covers (stage1.probe_results "all"), or its last ("last"). Steps
    covering no CoT step are scored over the examples that have one."""
    tok = model.tokenizer
    ids, visible = pad([prompt(tok, e) for e in examples], tok.pad_id, left=True)
    _, _, _, forks = thoughts_after_prompt(model, prefill(model, ids, visible), K)
    pick = slice(0, 1) if which == "first" else slice(-1, None)
    scores = []
    for k, (cache, positions) in enumerate(forks):
        nxt = torch.full((len(examples), 1), tok.eot_id)
        out = []
        for _ in range(max_tokens):
            final, _ = teacher_force(model, cache, positions, nxt, torch.ones_like(nxt, dtype=torch.bool))
            nxt, positions = model.backbone.head(final[:, -1]).argmax(-1, keepdim=True), positions + 1
            out.append(nxt)
        texts = [tok.decode(_until_eos(row, tok.eos_id)) for row in torch.cat(out, 1).tolist()]
        hits = [re.match(r"####\s*(-?\d+)", t.strip()) for t in texts]
        wanted = [segment_results(e, K)[k][pick] for e in examples]
        judged = [(h is not None and h.group(1) == w[0]) for h, w in zip(hits, wanted) if w]
        scores.append(sum(judged) / max(len(judged), 1))
    return scores


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    """What decoding would have written: the ids before the first <eos> (decoding stops there)."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _mse(student: torch.Tensor, target: torch.Tensor, normalise: str | None) -> torch.Tensor:
    """Mean squared error against a stop-gradient target ([N, d] rows of states). `normalise`
    divides the difference first: "std" by the target's std (CODI's), "dim" by each
    dimension's std over the rows, floored at a tenth of the overall std."""
    target = target.detach()
    scale = 1.0
    if normalise is not None:
        scale = layer_std(target)
        if normalise == "dim":
            scale = target.std(dim=0, keepdim=True).clamp(min=0.1 * scale) if len(target) > 1 else scale
    return ((student - target) / scale).pow(2).mean()


def segment_alignment(teacher: torch.Tensor, thoughts: list[torch.Tensor], segment_pos: torch.Tensor,
                      normalise: str | None = None) -> torch.Tensor:
    """Mean squared error between latent step k's state (thoughts[k], [B, d]) and the teacher's
    state ([B, T, d], one layer) at the end of segment k, over the (example, step) pairs whose
    segment is not empty; `normalise` ("std" or "dim") scales the differences as `_mse` says.
    Rows past the teacher's (`stage1.teacher_rows`) have no segment to align to."""
    if normalise is None:  # a masked mean: no data-dependent shape, so no host sync in the step
        pos = segment_pos[: len(teacher), : len(thoughts)]
        rows = torch.arange(len(pos), device=pos.device)[:, None]
        target = teacher[rows, pos.clamp(min=0)].detach()  # [taught, K, d]; empty segments masked below
        err = (torch.stack(thoughts, 1)[: len(teacher)] - target).pow(2).mean(-1)
        aligned = pos >= 0
        return (err * aligned).sum() / aligned.sum().clamp(min=1)
    rows, cols = (segment_pos[:, : len(thoughts)] >= 0).nonzero(as_tuple=True)
    if not len(rows):
        return teacher.new_zeros(())
    student = torch.stack(thoughts, 1)[rows, cols]
    return _mse(student, teacher[rows, segment_pos[rows, cols]], normalise)


def codi_alignment(teacher_states, student_states, teacher_pos, student_pos, scale: str = "std") -> torch.Tensor:
    """Every layer, the position before the answer, normalised by the teacher's std (`scale`
    "dim": each dimension's own, as `_mse` says)."""
    rows = torch.arange(teacher_pos.shape[0], device=teacher_pos.device)
    losses = []
    for t_layer, s_layer in zip(teacher_states, student_states):
        losses.append(_mse(s_layer[rows, student_pos], t_layer[rows, teacher_pos], normalise=scale))
    return torch.stack(losses).mean()
