"""The backbone as the rest of system15 sees it: embed, one layer at a time, final norm, head.

We never re-implement a Transformer layer. `Backbone` wraps a real Hugging Face causal LM
(GPT-2 or Llama family) and calls its own decoder-layer modules in our loop, so that later
code can put shortcuts between layers and can run a layer on a subset of the batch rows.

The KV cache is ours (`KVCache`): per layer, keys and values of shape [B, H_kv, T, D] and a
boolean `visible` mask [B, T] saying which cached positions this layer may attend to
(padding is invisible everywhere; under kv_policy="skip" a skipped position is invisible at
the layer it skipped). HF attention modules only ever call `update(k, v, i)` on the cache they are handed,
so `_RowsView` hands a layer the cached rows it runs and captures the keys it writes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

FAMILIES = ("gpt2", "llama")
FUSED_GELU = "gelu_pytorch_tanh"


def family_of(model: PreTrainedModel) -> str:
    kind = model.config.model_type
    if kind == "gpt2":
        return "gpt2"
    if hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "rotary_emb"):
        return "llama"  # Llama, SmolLM2, Mistral-style decoders share this layout
    raise ValueError(f"unsupported backbone model_type {kind!r}; supported families: {FAMILIES}")


@dataclass
class KVCache:
    """Keys/values per layer, which cached positions are real (not padding), and, per layer,
    which positions are hidden from that layer's attention (kv_policy="skip" only).

    `keys[l]`/`values[l]` always hold exactly the cached positions. Where nothing needs their
    gradient (decoding), they are views of a buffer with room to grow (`_store`): a new
    position is written into it, and attention reads the buffer's filled part, instead of
    copying the whole cache twice per layer and step (once to append, once for attention).
    A buffer belongs to one cache; a fork or a prefix writes into a copy of its own."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    visible: torch.Tensor | None = None  # [B, T], False on padding
    hidden: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, T] or None
    _store: list = field(default_factory=list, repr=False)    # per layer: (keys, values) buffers, or None
    _written: list = field(default_factory=list, repr=False)  # per layer: the keys `reserve` already wrote

    def __post_init__(self):
        layers = len(self.keys)
        self._store = self._store or [None] * layers
        self._written = self._written or [None] * layers

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers, None, [None] * num_layers)

    @property
    def length(self) -> int:
        return 0 if self.visible is None else self.visible.shape[1]

    def fork(self) -> "KVCache":
        """An independent branch: it shares the cached tensors and writes into copies."""
        return KVCache(list(self.keys), list(self.values), self.visible, list(self.hidden))

    def prefix(self, length: int, visible: torch.Tensor) -> "KVCache":
        """The first `length` positions, of which only `visible` ([B, length]) stay visible:
        a prompt's cache cut out of a pass over `prompt + more`, right-padded."""
        def cut(t):
            return None if t is None else t[:, :, :length]

        return KVCache([cut(k) for k in self.keys], [cut(v) for v in self.values], visible & self.visible[:, :length],
                       [None if h is None else h[:, :length] for h in self.hidden])

    @classmethod
    def stack_rows(cls, caches: list["KVCache"]) -> "KVCache":
        """The rows of `caches` in one cache, in order, each padded on the right to the longest
        (zero keys and values at positions no layer sees)."""
        width = max(c.length for c in caches)

        def right(t, fill=0):  # pad the position dimension: 2 of keys/values, 1 of masks
            dim = 2 if t.dim() == 4 else 1
            return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, width - t.shape[dim]), value=fill)

        def hidden(c, layer):
            return right(c.hidden[layer] if c.hidden[layer] is not None else torch.zeros_like(c.visible), False)

        layers = range(len(caches[0].keys))
        return cls([torch.cat([right(c.keys[i]) for c in caches]) for i in layers],
                   [torch.cat([right(c.values[i]) for c in caches]) for i in layers],
                   torch.cat([right(c.visible, False) for c in caches]),
                   [None if all(c.hidden[i] is None for c in caches) else torch.cat([hidden(c, i) for c in caches])
                    for i in layers])

    @staticmethod
    def _in_place(k: torch.Tensor) -> bool:
        """Whether new keys may go into a buffer: not while autograd records (training)."""
        return not (k.requires_grad or torch.is_grad_enabled())

    def reserve(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write new positions (k, v: [B, H, q, D]) after layer `layer`'s cached ones in its
        buffer, without counting them as cached yet, and return every position's keys and
        values as views (what attention reads); None where they cannot go into a buffer.
        `append_kv` with the same tensors then only counts them."""
        if not self._in_place(k):
            return None
        old = self.keys[layer]
        n = 0 if old is None else old.shape[2]
        keys, values = self._room(layer, k, n + k.shape[2])
        keys[:, :, n:n + k.shape[2]] = k
        values[:, :, n:n + k.shape[2]] = v
        self._written[layer] = k
        return keys[:, :, :n + k.shape[2]], values[:, :, :n + k.shape[2]]

    def _room(self, layer: int, k: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s buffers with room for `need` positions: a new buffer (twice the need,
        holding what is cached) when there is none, it is full, or it does not fit k."""
        store = self._store[layer]
        if store is not None and store[0].shape[2] >= need and store[0].shape[0] == k.shape[0] \
                and store[0].dtype == k.dtype and store[0].shape[3] == k.shape[3]:
            return store
        capacity = max(2 * need, need + 64)
        old_k, old_v = self.keys[layer], self.values[layer]
        keys = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        values = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])  # values share the keys' shape
        if old_k is not None:
            keys[:, :, :old_k.shape[2]] = old_k
            values[:, :, :old_v.shape[2]] = old_v
        self._store[layer] = (keys, values)
        return keys, values

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new positions (k, v: [B, H, q, D]) to one layer."""
        old = self.keys[layer]
        if not self._in_place(k):
            self._store[layer] = None  # views of a buffer must not be written once autograd holds them
            self.keys[layer] = k if old is None else torch.cat([old, k], dim=2)
            self.values[layer] = v if old is None else torch.cat([self.values[layer], v], dim=2)
            return
        n, q = 0 if old is None else old.shape[2], k.shape[2]
        if self._written[layer] is k:  # `reserve` wrote them for attention already
            keys, values = self._store[layer]
        else:
            keys, values = self._room(layer, k, n + q)
            keys[:, :, n:n + q] = k
            values[:, :, n:n + q] = v
        self._written[layer] = None
        self.keys[layer], self.values[layer] = keys[:, :, :n + q], values[:, :, :n + q]

    def append_positions(self, visible: torch.Tensor, hidden: list[torch.Tensor | None] | None = None) -> None:
        """Record q new positions (visible: [B, q]); `hidden[l]` marks those layer l must not see."""
        past = self.length
        self.visible = visible if self.visible is None else torch.cat([self.visible, visible], dim=1)
        for layer in range(len(self.keys)):
            new = None if hidden is None else hidden[layer]
            if new is None and self.hidden[layer] is None:
                continue
            if new is None:
                new = torch.zeros_like(visible)
            old = self.hidden[layer]
            if old is None:
                old = torch.zeros(visible.shape[0], past, dtype=torch.bool, device=visible.device)
            self.hidden[layer] = torch.cat([old, new], dim=1)

    def visible_to(self, layer: int) -> torch.Tensor | None:
        if self.hidden[layer] is None or self.visible is None:
            return self.visible
        return self.visible & ~self.hidden[layer]


class _RowsView:
    """What a HF attention module sees as its cache (`cache`, or `past_key_values`) for one layer and some rows."""

    def __init__(self, cache: KVCache, layer: int, rows: torch.Tensor | None):
        self.cache, self.layer, self.rows = cache, layer, rows
        self.new_k: torch.Tensor | None = None
        self.new_v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        self.new_k, self.new_v = k, v
        past_k, past_v = self.cache.keys[self.layer], self.cache.values[self.layer]
        if past_k is None:
            return k, v
        if self.rows is not None:  # a subset of the rows: their cache is gathered (a copy) for attention
            return torch.cat([past_k[self.rows], k], dim=2), torch.cat([past_v[self.rows], v], dim=2)
        written = self.cache.reserve(self.layer, k, v)
        if written is not None:
            return written
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)


def attention_bias(past_visible: torch.Tensor | None, new_visible: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask [B, 1, q, T+q]: causal over the new block, `visible` over everything."""
    q = new_visible.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=new_visible.device).tril()
    allowed_new = causal[None] & new_visible[:, None, :]
    if past_visible is not None:
        allowed_past = past_visible[:, None, :].expand(-1, q, -1)
        allowed = torch.cat([allowed_past, allowed_new], dim=2)
    else:
        allowed = allowed_new
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


@dataclass
class StepContext:
    """Per-call inputs every layer needs: the mask bias and (Llama) the rotary embedding."""

    bias: torch.Tensor  # [B, 1, q, T+q]
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: [B, q, D]
    new_visible: torch.Tensor  # [B, q]
    _swapped: tuple | None = field(default=None, repr=False)

    def rows(self, idx: torch.Tensor) -> "StepContext":
        rotary = None if self.rotary is None else (self.rotary[0][idx], self.rotary[1][idx])
        return StepContext(self.bias[idx], rotary, self.new_visible[idx])

    def swapped_rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin') [B, q, 1, D] such that keys k [B, q, H, D] rotate as
        k * cos + swap(k) * sin', where swap exchanges k's two halves (a flip of [2, D/2]) and
        sin' is sin with its first half negated: rotate_half(k) * sin without rotate_half's
        slices, negation and concatenation. Made once per step, for every layer's fill."""
        if self._swapped is None:
            cos, sin = self.rotary
            first, second = sin.chunk(2, dim=-1)
            self._swapped = (cos.unsqueeze(2), torch.cat([-first, second], -1).unsqueeze(2))
        return self._swapped


class Backbone(nn.Module):
    """A HF causal LM exposed as embed / layer(i) / final norm / head."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        self.family = family_of(lm)
        cfg = lm.config
        self.num_layers = cfg.num_hidden_layers if self.family == "llama" else cfg.n_layer
        self.hidden_size = cfg.hidden_size
        # the longest sequence: GPT-2's learned positions end there (an index error past it);
        # rotary positions would run on, into lengths the model never saw
        self.max_positions = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
        # the name a decoder layer takes its cache by: `cache` since transformers 5.24,
        # `past_key_values` before (still accepted there, with a warning, until 5.40)
        params = inspect.signature(type(self.layers[0]).forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if self.family == "gpt2" and cfg.activation_function == "gelu_new":
            # GPT-2's tanh GELU, as HF writes it, is seven elementwise ops; torch's fused
            # kernel computes the same function (to float rounding) in one, and training and
            # decoding run it at every layer.
            cfg.activation_function = FUSED_GELU
            for block in self.layers:
                block.mlp.act = ACT2FN[FUSED_GELU]

    # -- pieces -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.transformer.h if self.family == "gpt2" else self.lm.model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, before any position information."""
        return self.lm.get_input_embeddings()(ids)

    def layer_input(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What layer 1 reads: GPT-2 adds learned positions here; Llama rotates inside attention."""
        if self.family == "gpt2":
            tr = self.lm.transformer
            return tr.drop(embeds + tr.wpe(positions))
        return embeds

    def context(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                new_visible: torch.Tensor | None = None) -> StepContext:
        if new_visible is None:
            new_visible = torch.ones(positions.shape, dtype=torch.bool, device=h.device)
        bias = attention_bias(cache.visible, new_visible, h.dtype)
        rotary = self.lm.model.rotary_emb(h, positions) if self.family == "llama" else None
        return StepContext(bias, rotary, new_visible)

    def layer_bias(self, ctx: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        """The mask for one layer: differs from the shared one only where kv_policy="skip" hid keys."""
        if cache.hidden[layer] is None:
            return ctx.bias
        return attention_bias(cache.visible_to(layer), ctx.new_visible, ctx.bias.dtype)

    def run_layer(self, layer: int, h: torch.Tensor, ctx: StepContext, cache: KVCache,
                  rows: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """Run the real HF layer `layer` on h (only `rows` of the batch when given).

        Returns (output, k_new, v_new) for those rows; the caller writes the cache."""
        view = _RowsView(cache, layer, rows)
        bias = ctx.bias if bias is None else bias
        block = self.layers[layer]
        if self.family == "gpt2":
            out = block(h, attention_mask=bias, **{self.cache_kwarg: view})
        else:
            out = block(h, attention_mask=bias, position_embeddings=ctx.rotary, **{self.cache_kwarg: view})
        out = out[0] if isinstance(out, tuple) else out
        return out, view.new_k, view.new_v

    def layer_kv(self, layer: int, h_in: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values layer `layer` would write for input h_in, via its own norm, K/V
        projections and rotary embedding: the kv_policy="fill" cost of a skipped layer.
        Only the K/V columns are computed; the queries are never needed."""
        block = self.layers[layer]
        if self.family == "gpt2":
            norm, proj, cols = self.kv_projection(layer)
            x = F.layer_norm(h_in, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            kv = torch.addmm(proj.bias[cols], x.reshape(-1, x.shape[-1]), proj.weight[:, cols])
            return self.split_kv(layer, kv, h_in.shape[:-1])
        if torch.is_grad_enabled():  # training reads the layer's own modules, so gradients reach them
            from transformers.models.llama.modeling_llama import rotate_half

            shape = (*h_in.shape[:-1], -1, self.head_dim(layer))
            cos, sin = (t.unsqueeze(1) for t in ctx.rotary)  # [B, 1, q, D]: over the heads
            attn = block.self_attn
            x = block.input_layernorm(h_in)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(shape).transpose(1, 2)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(shape).transpose(1, 2)
            return k * cos + rotate_half(k) * sin, v
        # decoding: a fused norm, one product and the rotary in three operations; at batch 1
        # each small operation costs about as much as this product's arithmetic
        weight, bias = self._llama_kv(layer)
        dim = self.head_dim(layer)
        x = F.rms_norm(h_in, h_in.shape[-1:], eps=block.input_layernorm.variance_epsilon)
        k, v = F.linear(x, weight, bias).view(*h_in.shape[:-1], 2, -1, dim).unbind(-3)  # [B, q, H, D]
        cos, sin = ctx.swapped_rotary()
        swapped = k.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
        return torch.addcmul(k * cos, swapped, sin).transpose(1, 2), v.transpose(1, 2)

    def _llama_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Llama layer `layer`'s K and V projections stacked into one matrix, with its input
        RMSNorm's weight folded in (the norm scales each input dimension before the product),
        and their biases; made again whenever one of those weights changes."""
        attn, norm = self.layers[layer].self_attn, self.layers[layer].input_layernorm
        sources = (attn.k_proj.weight, attn.v_proj.weight, norm.weight)
        stamp = tuple((t.data_ptr(), t._version) for t in sources)
        folds = self.__dict__.setdefault("_kv_folds", {})
        if layer not in folds or folds[layer][0] != stamp:
            with torch.no_grad():
                weight = torch.cat([attn.k_proj.weight, attn.v_proj.weight]) * norm.weight[None, :]
                bias = None if attn.k_proj.bias is None else torch.cat([attn.k_proj.bias, attn.v_proj.bias])
            folds[layer] = (stamp, weight, bias)
        return folds[layer][1], folds[layer][2]

    def kv_projection(self, layer: int) -> tuple[nn.LayerNorm, nn.Module, slice] | None:
        """GPT-2: the layer's input LayerNorm, its attention input projection (HF Conv1D,
        weight [d, 3 H D]) and the slice of that projection's columns that are K and V, for
        `shortcuts.Shortcuts.folded` to fold into one matrix over the normalised input the
        router reads anyway. None for Llama: its RMSNorm does not normalise the way the
        router's LayerNorm does, and its keys still need the rotary embedding."""
        if self.family != "gpt2":
            return None
        block = self.layers[layer]
        return block.ln_1, block.attn.c_attn, slice(block.attn.split_size, None)

    def split_kv(self, layer: int, kv: torch.Tensor, lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """GPT-2's K/V columns [N, 2 H D] for inputs of leading shape `lead` ([B, q]) as the
        cache keeps them: keys and values, each [B, H, q, D]."""
        k, v = kv.view(*lead, 2, -1, self.head_dim(layer)).unbind(-3)
        return k.transpose(1, 2), v.transpose(1, 2)

    def head_dim(self, layer: int) -> int:
        block = self.layers[layer]
        return block.attn.head_dim if self.family == "gpt2" else block.self_attn.head_dim

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.transformer.ln_f(h) if self.family == "gpt2" else self.lm.model.norm(h)

    def head(self, h_normed: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(h_normed)

    # -- the plain loop -----------------------------------------------------------------
    def forward_full(self, embeds: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                     cache: KVCache | None = None, keep_layers: bool = False, after_layer=None):
        """Every layer on every position (prefill, teacher forcing, baselines).

        embeds: [B, q, d] token/latent inputs; positions: [B, q]; visible: [B, q] (False on
        padding). Writes into `cache` when given. `after_layer(i, h_in, out)`, when given,
        replaces each layer's output (stage 2 mixes in its shortcuts there); the cache keeps
        the keys and values of the layer's own input. Returns (final normed states [B, q, d],
        per-layer outputs list or None)."""
        cache = cache if cache is not None else KVCache.empty(self.num_layers)
        h = self.layer_input(embeds, positions)
        ctx = self.context(h, positions, cache, new_visible=visible)
        states = [] if keep_layers else None
        for i in range(self.num_layers):
            out, k, v = self.run_layer(i, h, ctx, cache, bias=self.layer_bias(ctx, cache, i))
            cache.append_kv(i, k, v)
            h = out if after_layer is None else after_layer(i, h, out)
            if keep_layers:
                states.append(h)
        cache.append_positions(visible)
        return self.final_norm(h), states


def positions_from_mask(visible: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, 2... over visible tokens (left padding safe)."""
    pos = visible.long().cumsum(-1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.clamp(min=0)
