"""FLOPs of a decoding step (flops.py), against counts made by hand from the tiny model's
shapes: width d = 32, 3 layers, adapters of 8, routers of 8 hidden units, P of width d."""

import pytest

from system15.engine import Route, generate
from system15.flops import FlopCounter
from system15.layout import prompt
from tests.helpers import encoded, randomise_routers, tiny_model

D, LAYERS, ADAPTER, ROUTER = 32, 3, 8, 8
GPT2_LAYER = 3 * D * D + D * D + 2 * (D * 4 * D)  # c_attn (q, k, v), c_proj, MLP in and out
ROUTER_WEIGHTS = D * (ROUTER + ADAPTER) + ROUTER  # read_in (shared with g_l's down-projection), score
ADAPTER_WEIGHTS = D * ADAPTER + 2 * ADAPTER * D  # read_prev (g'_l down), write (g_l and g'_l up)
P_WEIGHTS = 2 * D * D  # P: Linear(d, d), GELU, Linear(d, d)


def test_the_counter_reads_the_models_shapes(examples):
    model = tiny_model(examples, "gpt2", shortcuts=True)
    assert FlopCounter.for_model(model) == FlopCounter(
        layer_weights=GPT2_LAYER, attn_width=D, kv_weights=2 * D * D, router_weights=ROUTER_WEIGHTS,
        adapter_weights=ADAPTER_WEIGHTS, projection_weights=P_WEIGHTS)


def test_a_llama_layer_counts_its_gated_mlp_and_no_norm(examples):
    """q, k, v, o (4 d^2) and gate, up, down (3 x d x 4d); RMSNorm scales are not products."""
    counter = FlopCounter.for_model(tiny_model(examples, "llama"))
    assert (counter.layer_weights, counter.attn_width, counter.kv_weights) == (4 * D * D + 3 * D * 4 * D, D, 2 * D * D)
    assert (counter.router_weights, counter.adapter_weights) == (0, 0)  # no shortcuts yet


def test_each_part_costs_two_flops_per_weight_and_attention_grows_with_the_context():
    c = FlopCounter(layer_weights=100, attn_width=4, kv_weights=10, router_weights=3, adapter_weights=5,
                    projection_weights=7)
    assert c.full_layer(context=6) == 2 * 100 + 4 * 4 * 6  # scores and weighted sum: 2 x 2 x width per key
    assert c.skipped_layer(fill=True) == 2 * 5 + 2 * 10
    assert c.skipped_layer(fill=False) == 2 * 5
    assert (c.router(), c.projection()) == (6, 14)


def full_layer(context: int) -> int:
    return 2 * GPT2_LAYER + 4 * D * context


def skipped_layer(fill: bool) -> int:
    return 2 * ADAPTER_WEIGHTS + (2 * 2 * D * D if fill else 0)


@pytest.mark.parametrize("policy", ["fill", "skip"])
def test_a_path_that_skips_layers_costs_what_the_hand_count_says(examples, policy):
    """K = 2 thought steps and <eot> (max_new_tokens=1 stops there): 3 decoding steps, the
    t-th attending to the prompt's P positions and t new ones. Every step runs the 3 routers;
    thought steps also run P. Full path: every layer runs. Skipping path: layer 2 (of 1..3)
    is replaced by its shortcut at every step, so it costs its adapters (and K/V under fill)."""
    model = randomise_routers(tiny_model(examples, "gpt2", shortcuts=True))
    ids = prompt(model.tokenizer, encoded(model, examples[:1])[0])
    P = len(ids)
    steps = [(t, t <= 2) for t in (1, 2, 3)]  # (step, is a thought step)

    def run(skip_middle: bool) -> int:
        route = Route("hard", 0.5, policy, skip=[[False, skip_middle, False]])
        (gen,) = generate(model, [ids], K=2, route=route, max_new_tokens=1)
        assert gen.thought_steps == 2 and len(gen.ran) == 3
        assert gen.ran == [[True, not skip_middle, True]] * 3
        return gen.flops

    full = sum(2 * P_WEIGHTS * thought + LAYERS * (full_layer(P + t) + 2 * ROUTER_WEIGHTS) for t, thought in steps)
    skipping = sum(2 * P_WEIGHTS * thought + 2 * full_layer(P + t) + skipped_layer(policy == "fill")
                   + LAYERS * 2 * ROUTER_WEIGHTS for t, thought in steps)
    assert run(skip_middle=False) == full
    assert run(skip_middle=True) == skipping
    assert full - skipping == sum(full_layer(P + t) - skipped_layer(policy == "fill") for t, _ in steps)


def test_a_model_without_shortcuts_pays_no_router(examples):
    model = tiny_model(examples, "gpt2")
    ids = prompt(model.tokenizer, encoded(model, examples[:1])[0])
    (gen,) = generate(model, [ids], K=1, max_new_tokens=1)  # one thought step, then <eot>
    P = len(ids)
    assert gen.flops == 2 * P_WEIGHTS + LAYERS * full_layer(P + 1) + LAYERS * full_layer(P + 2)


def test_a_trained_token_costs_six_flops_per_layer_and_head_weight(examples):
    """6 N: forward (2) and backward (4) through every layer's matrices and the LM head (V x d)."""
    from system15.flops import training_flops_per_token

    model = tiny_model(examples, "gpt2", shortcuts=True)  # shortcuts and P are not the backbone's
    assert training_flops_per_token(model) == 6 * (LAYERS * GPT2_LAYER + len(model.tokenizer) * D)
