"""Decoding: the prompt prefill, one decoding step with per-row per-layer routing, and
batched greedy generation for every method.

`decode_step` is the single home of a decoding step. Stage 2 trains through it (route
"soft"), inference runs it with a hard choice (route "hard"), and every other method runs it
with route "full". Under the hard choice, a layer that every row skips does no attention or
MLP work. Where the rows of a batch disagree, the layer either runs on the gathered rows that
need it (its output scattered back), or runs on every row with the shortcut's output kept
where a row skips, whichever a cost model measured on the backbone says is faster
(`_gathers`). Skipped rows still write layer l's keys/values from their input (kv_policy
"fill"), or are hidden from layer l's attention (kv_policy "skip").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .backbone import Backbone, KVCache, positions_from_mask
from .flops import FlopCounter
from .layout import pad
from .runtime import synchronize


@dataclass(frozen=True)
class Route:
    mode: str = "full"          # full | soft | hard
    lambda_depth: float = 0.5
    kv_policy: str = "fill"
    rows: str = "auto"          # hard route, rows of a batch that disagree at a layer: gather | dense | auto (measured)
    # hard route only: a forced decision, bool [rows, layers] (True = skip f_l for that row),
    # tensor or nested lists. The routers still run (their cost is what a forced pattern
    # measures against the full path); their decision is replaced by this one (speed.py).
    skip: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.skip is not None:
            rows = self.skip.tolist() if isinstance(self.skip, torch.Tensor) else self.skip
            rows = tuple(tuple(bool(s) for s in row) for row in rows)
            object.__setattr__(self, "skip", rows)
            object.__setattr__(self, "_by_layer", tuple(zip(*rows)))  # per layer, per row: read once per layer

    def forced(self, layer: int, batch: int, layers: int) -> tuple[bool, ...]:
        """The forced decision at `layer`, one bool per row."""
        by_layer = self._by_layer
        if len(self.skip) != batch or len(by_layer) != layers:
            raise ValueError(f"forced skip mask is {len(self.skip)} rows x {len(by_layer)} layers; "
                             f"the step has {batch} rows and the model {layers} layers")
        return by_layer[layer]

    @property
    def threshold(self) -> float:
        """lambda_depth on the router's logit scale: w = sigmoid(logit) > lambda exactly when
        logit > log(lambda / (1 - lambda)), so the hard choice needs no sigmoid."""
        if self.lambda_depth <= 0:
            return -math.inf
        if self.lambda_depth >= 1:
            return math.inf
        return math.log(self.lambda_depth / (1 - self.lambda_depth))


FULL = Route()


@dataclass
class StepResult:
    hidden: torch.Tensor            # [B, d] final-normed state (what the head reads)
    layers: list[torch.Tensor]      # h_{l,t} for every layer, each [B, d]
    weights: torch.Tensor | None    # [B, L] router scores (soft route only: the hard choice reads logits)
    ran: list[list[bool]]           # [B][L] True where f_l ran for the row


def prefill(model, ids: torch.Tensor, visible: torch.Tensor):
    """Run the (left-padded) prompt in full. Returns cache, h_L of the last position,
    every layer's state at the last position (the first step's horizontal input), and
    the next position ids."""
    bb: Backbone = model.backbone
    positions = positions_from_mask(visible)
    cache = KVCache.empty(bb.num_layers)
    final, states = bb.forward_full(bb.embed(ids), positions, visible, cache, keep_layers=True)
    return cache, final[:, -1], [s[:, -1] for s in states], positions[:, -1] + 1


def fill_kv(bb: Backbone, fold, layer: int, h: torch.Tensor, normed: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values a skipped layer writes under kv_policy "fill", for inputs h [N, 1, d]
    that `fold.decide` normalised (`normed`, [N, d]): one product where the backbone's K/V
    projection folds into the shortcut (GPT-2), the layer's own norm and projections elsewhere."""
    if fold.kv is None:
        return bb.layer_kv(layer, h, ctx)
    return bb.split_kv(layer, fold.fill(normed), h.shape[:-1])


def _hard_layer(bb: Backbone, fold, layer, h, h_prev, ctx, cache, bias, route):
    """One layer under the hard choice: f_l only on the rows whose score is <= lambda.
    `fold` is the layer's FoldedShortcut; h is [B, 1, d], h_prev [B, d].

    Returns (out, k, v, skipped, hidden): `skipped` is a list of bools, one per row, read
    from the logits in one host transfer (at batch 1 a layer is too cheap for more)."""
    x = h[:, 0]
    normed, act, logits = fold.decide(x)
    skipped = [logit > route.threshold for logit in logits.view(-1).tolist()]
    if route.skip is not None:  # forced: the router ran and was read, as above; its decision is replaced
        skipped = route.forced(layer, h.shape[0], bb.num_layers)
    if not any(skipped):
        out, k, v = bb.run_layer(layer, h, ctx, cache, bias=bias)
        return out, k, v, skipped, None
    fill = route.kv_policy == "fill"
    if all(skipped):  # always so at batch 1 when the row skips: no gather/scatter
        out = fold.branch(x, act, h_prev)[:, None]
        if fill:
            k, v = fill_kv(bb, fold, layer, h, normed, ctx)
            return out, k, v, skipped, None
        k = torch.zeros_like(cache.keys[layer][:, :, :1])
        return out, k, torch.zeros_like(k), skipped, torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)
    skip = torch.tensor(skipped, device=h.device)
    if _gathers(bb, fold, layer, h, h_prev, ctx, cache, bias, route, sum(skipped)):
        return (*_gathered(bb, fold, layer, h, h_prev, ctx, cache, bias, skip, normed, act, fill), skipped,
                None if fill else skip[:, None])
    return (*_dense(bb, fold, layer, h, h_prev, ctx, cache, bias, skip, act), skipped, None if fill else skip[:, None])


def _gathered(bb: Backbone, fold, layer, h, h_prev, ctx, cache, bias, skip, normed, act, fill):
    """Rows that disagree, by gathering: f_l on the rows that run only (their cache rows
    copied out for attention), the shortcut on the others, the outputs scattered back."""
    x = h[:, 0]
    run_rows = (~skip).nonzero(as_tuple=True)[0]
    skip_rows = skip.nonzero(as_tuple=True)[0]
    out = torch.empty_like(h)
    out[skip_rows] = fold.branch(x[skip_rows], act[skip_rows], h_prev[skip_rows])[:, None]
    out_run, k_run, v_run = bb.run_layer(layer, h[run_rows], ctx.rows(run_rows), cache, rows=run_rows, bias=bias[run_rows])
    out[run_rows] = out_run
    k = k_run.new_zeros((h.shape[0], *k_run.shape[1:]))
    v = torch.zeros_like(k)
    k[run_rows], v[run_rows] = k_run, v_run
    if fill:
        k[skip_rows], v[skip_rows] = fill_kv(bb, fold, layer, h[skip_rows], normed[skip_rows], ctx.rows(skip_rows))
    return out, k, v


def _dense(bb: Backbone, fold, layer, h, h_prev, ctx, cache, bias, skip, act):
    """Rows that disagree, without gathering: f_l on every row and the shortcut's output kept
    where a row skips. A skipped row's keys and values are then the layer's own, which is
    what kv_policy "fill" writes (and "skip" hides). Its FLOPs are still counted as skipped:
    the method did not need them, the batch's bookkeeping did."""
    full, k, v = bb.run_layer(layer, h, ctx, cache, bias=bias)
    out = torch.where(skip[:, None, None], fold.branch(h[:, 0], act, h_prev)[:, None], full)
    return out, k, v


GATHER_TRIALS = 3  # timed calls per strategy and split when a batch size is first measured


def _gathers(bb: Backbone, fold, layer, h, h_prev, ctx, cache, bias, route, skipping: int) -> bool:
    """Whether gathering beats running every row, for a layer where `skipping` of the batch's
    rows skip: route.rows "gather" or "dense" decides; "auto" asks a cost model measured once
    per backbone and batch size on the first layer that needs it, with that layer's own
    inputs. Gathering saves f_l on the skipped rows but copies the running rows' cache out
    for attention and scatters the outputs back: on a small model at a small batch the
    copies cost more than the layer, on a large one the layer dominates."""
    if route.rows != "auto":
        return route.rows == "gather"
    batch = h.shape[0]
    table = bb.__dict__.setdefault("_gather_from", {})  # batch size -> fewest skipping rows for which gathering pays
    if batch not in table:
        table[batch] = _measure_gather(bb, fold, layer, h, h_prev, ctx, cache, bias, route)
    return skipping >= table[batch]


def _measure_gather(bb: Backbone, fold, layer, h, h_prev, ctx, cache, bias, route) -> int:
    """The fewest skipping rows from which gathering was faster than running every row, over
    splits of a quarter, half and three quarters of the batch (the batch size when never)."""
    batch = h.shape[0]
    normed, act, _ = fold.decide(h[:, 0])
    fill = route.kv_policy == "fill"

    def best(call) -> float:
        times = []
        for _ in range(GATHER_TRIALS):
            synchronize(h.device)
            began = time.perf_counter()
            call()
            synchronize(h.device)
            times.append(time.perf_counter() - began)
        return min(times)

    for skipping in sorted({max(1, min(batch - 1, round(batch * share))) for share in (0.25, 0.5, 0.75)}):
        skip = torch.arange(batch, device=h.device) < skipping
        gather = best(lambda: _gathered(bb, fold, layer, h, h_prev, ctx, cache, bias, skip, normed, act, fill))
        dense = best(lambda: _dense(bb, fold, layer, h, h_prev, ctx, cache, bias, skip, act))
        if gather < dense:
            return skipping
    return batch


def decode_step(model, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                prev: list[torch.Tensor], route: Route = FULL, folded=None) -> StepResult:
    """One new position per row. x: [B, d] input vectors; prev: h_{l,t-1} per layer.
    `folded`: the hard choice's FoldedShortcuts when the caller already holds them (checking
    that they are current walks every shortcut parameter, too slow to repeat at every step)."""
    bb: Backbone = model.backbone
    batch = x.shape[0]
    h = bb.layer_input(x[:, None], positions[:, None])
    ctx = bb.context(h, positions[:, None], cache)
    mode = route.mode if model.shortcuts is not None else "full"
    shortcuts = None
    if mode == "soft":
        shortcuts = model.shortcuts.layers
    elif mode == "hard":
        shortcuts = folded or model.shortcuts.folded(bb)
    layers, weights, hidden = [], [], []
    ran = [[True] * bb.num_layers for _ in range(batch)]
    for layer in range(bb.num_layers):
        bias = bb.layer_bias(ctx, cache, layer)
        hid = None
        if mode == "full":
            out, k, v = bb.run_layer(layer, h, ctx, cache, bias=bias)
        elif mode == "soft":
            sc = shortcuts[layer]
            w, depth = sc.route(h)
            weights.append(w[:, 0, 0])
            full, k, v = bb.run_layer(layer, h, ctx, cache, bias=bias)
            out = sc.mix(w, sc.branch(h, depth, prev[layer][:, None]), full)
        else:
            out, k, v, skipped, hid = _hard_layer(bb, shortcuts[layer], layer, h, prev[layer], ctx, cache, bias, route)
            for row, skip in enumerate(skipped):
                ran[row][layer] = not skip
        cache.append_kv(layer, k, v)
        layers.append(out[:, 0])
        hidden.append(hid)
        h = out
    cache.append_positions(torch.ones(batch, 1, dtype=torch.bool, device=x.device), hidden)
    return StepResult(bb.final_norm(h)[:, 0], layers, torch.stack(weights, 1) if weights else None, ran)


@dataclass
class Generation:
    """What one row produced, and the compute it took."""

    tokens: list[int]                 # generated ids, up to and including <eos>
    thought_steps: int
    flops: int = 0
    ran: list[list[bool]] = field(default_factory=list)   # per decoding step, per layer
    emitted: list[int | None] = field(default_factory=list)  # per decoding step: token it produced (None for thoughts)

    @property
    def decoding_steps(self) -> int:
        return self.thought_steps + len(self.tokens)


class _Ledger:
    """Per-row FLOPs and routing of every decoding step, only while the row is unfinished."""

    def __init__(self, model, gens: list[Generation], route: Route):
        self.counter = FlopCounter.for_model(model)
        self.gens, self.route = gens, route
        self.routed = model.shortcuts is not None and route.mode != "full"
        self.thought_flops = self.counter.projection() if model.thought == "latent" else 0

    def record(self, res: StepResult, cache: KVCache, active: torch.Tensor, emitted, thought: bool):
        c = self.counter
        ran = res.ran
        context = cache.visible.sum(1).cpu().tolist()
        live = active.tolist()
        emitted = None if emitted is None else emitted.tolist()
        fill = self.route.kv_policy == "fill"
        for row, gen in enumerate(self.gens):
            if not live[row]:
                continue
            flops = self.thought_flops if thought else 0
            for layer_ran in ran[row]:
                flops += c.full_layer(context[row]) if layer_ran else c.skipped_layer(fill)
                flops += c.router() if self.routed else 0
            gen.flops += flops
            gen.ran.append(ran[row])
            gen.emitted.append(None if emitted is None else emitted[row])


@torch.inference_mode()  # not just no_grad: no version counters or view tracking, a tenth off every decode on CPU
def generate(model, prompts: list[list[int]], *, K: int | None, route: Route = FULL,
             max_new_tokens: int = 64, account: bool = True) -> list[Generation]:
    """Greedy decoding for a batch of prompts (`question <bot>` ids).

    K=None: token mode (CoT): the model writes its own chain. K >= 0: K thought steps, then
    `<eot>` is fed and the answer decoded; K=0 is answer-only (No-CoT). account=False skips
    the per-step FLOP and routing bookkeeping (latency runs time the model, not the ledger)."""
    tok = model.tokenizer
    device = next(model.parameters()).device
    ids, visible = pad(prompts, tok.pad_id, left=True)
    ids, visible = ids.to(device), visible.to(device)
    batch = len(prompts)
    gens = [Generation([], K or 0) for _ in range(batch)]
    ledger = _Ledger(model, gens, route) if account else None
    cache, last, prev, positions = prefill(model, ids, visible)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    folded = model.shortcuts.folded(model.backbone) if model.shortcuts is not None and route.mode == "hard" else None

    def step(x):
        nonlocal last, prev, positions
        res = decode_step(model, x, positions, cache, prev, route, folded)
        last, prev, positions = res.hidden, res.layers, positions + 1
        return res

    def record(res, emitted, thought):
        if ledger is not None:
            ledger.record(res, cache, active, emitted, thought)

    for k in range(K or 0):
        record(step(model.thought_input(k, last)), None, thought=True)
    if K is not None:
        res = step(model.backbone.embed(torch.full((batch,), tok.eot_id, device=device)))
    nxt = model.backbone.head(last).argmax(-1)
    if K is not None:
        record(res, nxt, thought=False)
    for produced in range(1, max_new_tokens + 1):
        for gen, token, live in zip(gens, nxt.tolist(), active.tolist()):
            if live:
                gen.tokens.append(token)
        active = active & (nxt != tok.eos_id)
        if not bool(active.any()) or produced == max_new_tokens:
            break
        res = step(model.backbone.embed(nxt))
        nxt = model.backbone.head(last).argmax(-1)
        record(res, nxt, thought=False)
    return gens
