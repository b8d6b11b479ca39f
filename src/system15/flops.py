"""FLOPs of one decoding step, counted from what actually ran.

We count matrix products only (2 FLOPs per multiply-add), as docs/design.md says: the attention
and MLP weight matrices of every layer that ran, the attention scores and weighted sum over
the cached length, the K/V projections a skipped layer still computes under kv_policy="fill",
the routers and adapters, and P for latent steps. Norms, activations and the LM head are
left out (the head is the same for every method and step).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _matmul_params(module: nn.Module) -> int:
    """Weights of every Linear / HF Conv1D inside `module` (each is one multiply-add per token)."""
    total = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if w is not None and w.dim() == 2 and not isinstance(m, nn.Embedding):
            total += w.numel()
    return total


@dataclass(frozen=True)
class FlopCounter:
    layer_weights: int      # matmul weights of one full layer (attention + MLP)
    attn_width: int         # heads * head_dim: the per-key cost of scores and weighted sum
    kv_weights: int         # weights of the K and V projections (the fill cost)
    router_weights: int = 0
    adapter_weights: int = 0  # both adapters of one layer
    projection_weights: int = 0

    @classmethod
    def for_model(cls, model) -> "FlopCounter":
        bb = model.backbone
        block = bb.layers[0]
        if bb.family == "gpt2":
            attn_width = block.attn.embed_dim
            kv = 2 * block.attn.c_attn.weight.shape[0] * attn_width
        else:
            attn = block.self_attn
            attn_width = attn.q_proj.weight.shape[0]
            kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
        router = adapters = 0
        if model.shortcuts is not None:
            sc = model.shortcuts[0]
            router = sum(_matmul_params(m) for m in sc.router_modules())
            adapters = sum(_matmul_params(m) for m in sc.adapter_modules())
        return cls(_matmul_params(block), attn_width, kv, router, adapters, _matmul_params(model.projection))

    def full_layer(self, context: int) -> int:
        """One layer for one new position attending to `context` keys (itself included)."""
        return 2 * self.layer_weights + 4 * self.attn_width * context

    def skipped_layer(self, fill: bool) -> int:
        return 2 * self.adapter_weights + (2 * self.kv_weights if fill else 0)

    def router(self) -> int:
        return 2 * self.router_weights

    def projection(self) -> int:
        return 2 * self.projection_weights


def training_flops_per_token(model) -> int:
    """Model FLOPs of one trained token, the usual 6 N: forward (2) and backward (4) through the
    matrix weights of every backbone layer and the LM head, attention over the sequence left
    out. The numerator of the training loop's model-FLOPs utilisation (`train.loop`)."""
    bb = model.backbone
    return 6 * (sum(_matmul_params(layer) for layer in bb.layers) + bb.lm.get_output_embeddings().weight.numel())
