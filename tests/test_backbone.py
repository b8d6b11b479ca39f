"""Our layer loop over the real HF modules must reproduce the HF model's own forward."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from system15.backbone import Backbone, KVCache, positions_from_mask


def hf_model(family, **llama):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=61, n_positions=64,
                                          bos_token_id=None, eos_token_id=None)).eval()
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=61, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None, **llama)).eval()


def padded_batch():
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    visible = torch.ones(3, 11, dtype=torch.bool)
    visible[1, :3] = False  # left padding of different lengths
    visible[2, :6] = False
    return ids, visible, positions_from_mask(visible)


def hf_reference(family):
    """A tiny HF model, our Backbone over it, a padded batch, and HF's own logits for it."""
    lm = hf_model(family)
    ids, visible, pos = padded_batch()
    ref = lm(input_ids=ids, attention_mask=visible.long(), position_ids=pos).logits
    return Backbone(lm), ids, visible, pos, ref


@torch.no_grad()
def test_loop_equals_hf_forward(family):
    bb, ids, visible, pos, ref = hf_reference(family)
    final, _ = bb.forward_full(bb.embed(ids), pos, visible)
    assert (bb.head(final) - ref)[visible].abs().max() <= 1e-4


def test_gpt2_runs_the_fused_tanh_gelu_and_says_so():
    """HF's reference logits above are taken before the swap, with gelu_new, so the loop tests
    also check that the fused kernel computes the same function."""
    bb = Backbone(hf_model("gpt2"))
    assert bb.lm.config.activation_function == "gelu_pytorch_tanh"  # what a saved config records
    x = torch.randn(4, 64)
    for block in bb.layers:
        torch.testing.assert_close(block.mlp.act(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=0, atol=0)


@torch.no_grad()
def test_loop_with_kv_cache_equals_hf_forward(family):
    bb, ids, visible, pos, ref = hf_reference(family)
    cache = KVCache.empty(bb.num_layers)
    outs = [bb.head(bb.forward_full(bb.embed(ids[:, :7]), pos[:, :7], visible[:, :7], cache)[0])]
    for t in range(7, 11):
        final, _ = bb.forward_full(bb.embed(ids[:, t:t + 1]), pos[:, t:t + 1], visible[:, t:t + 1], cache)
        outs.append(bb.head(final))
    assert (torch.cat(outs, 1) - ref)[visible].abs().max() <= 1e-4
    assert cache.length == 11


@torch.no_grad()
def test_layer_kv_matches_the_keys_the_layer_writes(family):
    """kv_policy=fill computes a skipped layer's K/V with its own projections: same as running it."""
    bb = Backbone(hf_model(family))
    ids, visible, pos = padded_batch()
    cache = KVCache.empty(bb.num_layers)
    h = bb.layer_input(bb.embed(ids), pos)
    ctx = bb.context(h, pos, cache, new_visible=visible)
    _, k, v = bb.run_layer(0, h, ctx, cache)
    k_fill, v_fill = bb.layer_kv(0, h, ctx)
    assert torch.allclose(k, k_fill, atol=1e-6) and torch.allclose(v, v_fill, atol=1e-6)


def test_llama_fill_keeps_the_projection_biases_through_the_rotation():
    """Decoding's fill computes rotate_half(k) by a rearranged copy of the K projection; its
    bias must be rearranged the same way (Llama-family models with attention_bias)."""
    bb = Backbone(hf_model("llama", attention_bias=True))
    with torch.no_grad():
        for block in bb.layers:
            for proj in (block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.normal_()
        ids, visible, pos = padded_batch()
        cache = KVCache.empty(bb.num_layers)
        h = bb.layer_input(bb.embed(ids), pos)
        ctx = bb.context(h, pos, cache, new_visible=visible)
        for layer in range(bb.num_layers):
            _, k, v = bb.run_layer(layer, h, ctx, cache)
            k_fill, v_fill = bb.layer_kv(layer, h, ctx)
            torch.testing.assert_close(k_fill, k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_fill, v, atol=1e-5, rtol=1e-5)


def test_unsupported_model_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ValueError, match="unsupported backbone"):
        Backbone(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)))


def test_stacked_caches_keep_each_rows_keys_and_hide_the_padding():
    from system15.backbone import KVCache

    short, long = KVCache.empty(1), KVCache.empty(1)
    short.append_kv(0, torch.ones(1, 2, 3, 4), 2 * torch.ones(1, 2, 3, 4))
    short.append_positions(torch.tensor([[False, True, True]]))
    long.append_kv(0, torch.full((2, 2, 5, 4), 3.0), torch.full((2, 2, 5, 4), 4.0))
    long.append_positions(torch.ones(2, 5, dtype=torch.bool), [torch.tensor([[False] * 4 + [True]] * 2)])
    both = KVCache.stack_rows([short, long])
    assert both.keys[0].shape == (3, 2, 5, 4) and both.length == 5
    assert both.keys[0][0, :, :3].eq(1).all() and both.keys[0][0, :, 3:].eq(0).all() and both.values[0][1:].eq(4).all()
    assert both.visible.tolist() == [[False, True, True, False, False]] + [[True] * 5] * 2
    assert both.visible_to(0).tolist() == [[False, True, True, False, False]] + [[True] * 4 + [False]] * 2
