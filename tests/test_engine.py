"""Inference engine: the hard choice really skips layers, and every policy behaves as documented."""

import copy

import pytest
import torch

from system15.engine import FULL, Route, decode_step, fill_kv, generate, prefill
from system15.layout import encode, pad, prompt

from tests.helpers import encoded, randomise_routers, tiny_model


def prompts_of(model, examples):
    return [prompt(model.tokenizer, encode(model.tokenizer, e)) for e in examples]


def test_threshold_one_equals_the_stage1_model(examples, family):
    model = randomise_routers(tiny_model(examples, family, shortcuts=True))
    stage1 = copy.deepcopy(model)
    stage1.shortcuts = None
    prompts = prompts_of(model, examples[:6])
    ours = generate(model, prompts, K=2, route=Route("hard", 1.0), max_new_tokens=8)
    ref = generate(stage1, prompts, K=2, max_new_tokens=8)
    assert [g.tokens for g in ours] == [g.tokens for g in ref]
    assert all(all(all(step) for step in g.ran) for g in ours)  # every layer ran
    # and the states themselves are identical, not just the argmax
    ids, visible = pad(prompts, model.tokenizer.pad_id, left=True)
    with torch.no_grad():
        a = prefill(model, ids, visible)
        b = prefill(stage1, ids, visible)
        x = model.thought_input(0, a[1])
        ra = decode_step(model, x, a[3], a[0], a[2], Route("hard", 1.0))
        rb = decode_step(stage1, x, b[3], b[0], b[2], FULL)
    assert torch.equal(ra.hidden, rb.hidden)


def count_layer_calls(model):
    calls = {"attention": 0, "mlp": 0}
    hooks = []
    for block in model.backbone.layers:
        attn = block.attn if model.backbone.family == "gpt2" else block.self_attn
        hooks.append(attn.register_forward_hook(lambda *a: calls.__setitem__("attention", calls["attention"] + 1)))
        hooks.append(block.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1)))
    return calls, hooks


def test_threshold_zero_runs_no_attention_or_mlp_while_decoding(examples, family):
    model = randomise_routers(tiny_model(examples, family, shortcuts=True))
    calls, hooks = count_layer_calls(model)
    gens = generate(model, prompts_of(model, examples[:4]), K=2, route=Route("hard", 0.0), max_new_tokens=6)
    for h in hooks:
        h.remove()
    layers = model.num_layers
    assert calls == {"attention": layers, "mlp": layers}  # the prompt prefill only
    assert all(not any(step) for g in gens for step in g.ran)
    assert all(g.decoding_steps >= 3 for g in gens)


def test_fill_writes_the_layers_own_kv_and_skip_hides_the_position(examples, family):
    model = randomise_routers(tiny_model(examples, family, shortcuts=True))
    ids, visible = pad(prompts_of(model, examples[:3]), model.tokenizer.pad_id, left=True)
    with torch.no_grad():
        results = {}
        for policy in ("fill", "skip"):
            cache, last, prev, pos = prefill(model, ids, visible)
            x = model.thought_input(0, last)
            h_in = model.backbone.layer_input(x[:, None], pos[:, None])
            step = decode_step(model, x, pos, cache, prev, Route("hard", 0.0, policy))  # every layer skipped
            results[policy] = (cache, step, h_in, pos)
        cache, _, h_in, pos = results["fill"]
        ctx = model.backbone.context(h_in, pos[:, None], cache)
        k0, v0 = model.backbone.layer_kv(0, h_in, ctx)
        # GPT-2's fill runs folded into the router's normalisation (engine.fill_kv): equal within rounding
        assert torch.allclose(cache.keys[0][:, :, -1:], k0, atol=1e-5) and torch.allclose(cache.values[0][:, :, -1:], v0, atol=1e-5)
        assert all(h is None for h in cache.hidden)
        assert bool(cache.visible_to(1)[:, -1].all())
        cache_s = results["skip"][0]
        for layer in range(model.num_layers):
            assert not bool(cache_s.visible_to(layer)[:, -1].any())  # hidden from every layer it skipped
            assert bool(cache_s.visible_to(layer)[:, :-1].eq(cache_s.visible[:, :-1]).all())

        def next_step(cache, step, poke):
            c = cache.fork()
            if poke:  # change what was stored for the skipped position
                c.keys = [k.clone() for k in c.keys]
                for k in c.keys:
                    k[:, :, -1] += 5.0
            return decode_step(model, model.thought_input(1, step.hidden), pos + 1, c, step.layers, FULL).hidden

        _, step_s, _, _ = results["skip"]
        assert torch.equal(next_step(cache_s, step_s, False), next_step(cache_s, step_s, True))  # invisible
        _, step_f, _, _ = results["fill"]
        assert not torch.allclose(next_step(cache, step_f, False), next_step(cache, step_f, True))  # attended


def test_soft_mix_with_closed_router_equals_full_layer(examples, family):
    model = tiny_model(examples, family, shortcuts=True)
    with torch.no_grad():
        for layer in model.shortcuts.layers:
            layer.score.bias.fill_(-1e4)  # w = sigmoid(-1e4) = 0 exactly
            layer.write.weight.normal_()
    ids, visible = pad(prompts_of(model, examples[:3]), model.tokenizer.pad_id, left=True)
    with torch.no_grad():
        outs = []
        for route in (FULL, Route("soft")):
            cache, last, prev, pos = prefill(model, ids, visible)
            outs.append(decode_step(model, model.thought_input(0, last), pos, cache, prev, route))
    assert torch.equal(outs[0].hidden, outs[1].hidden)
    assert outs[1].weights.abs().max() == 0


def test_batched_and_one_at_a_time_give_the_same_answers(examples, family):
    model = randomise_routers(tiny_model(examples, family, shortcuts=True), seed=3)
    prompts = prompts_of(model, examples[:8])
    route = Route("hard", 0.5)
    batched = generate(model, prompts, K=2, route=route, max_new_tokens=8)
    single = [generate(model, [p], K=2, route=route, max_new_tokens=8)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    assert [g.ran for g in batched] == [g.ran for g in single]
    mixed = {r for g in batched for step in g.ran for r in step}
    assert mixed == {True, False}, "the routers should both run and skip layers in this case"


@pytest.mark.parametrize("policy", ["fill", "skip"])
def test_flops_fall_when_layers_are_skipped(examples, policy):
    model = randomise_routers(tiny_model(examples, "gpt2", shortcuts=True))
    prompts = prompts_of(model, examples[:4])
    full = generate(model, prompts, K=2, route=Route("hard", 1.0, policy), max_new_tokens=4)
    skip = generate(model, prompts, K=2, route=Route("hard", 0.0, policy), max_new_tokens=4)
    per_step = lambda gens: sum(g.flops for g in gens) / sum(len(g.ran) for g in gens)
    assert per_step(skip) < per_step(full) / 3


def test_the_fill_folds_into_the_router_where_the_norms_agree(examples, family):
    """GPT-2: the skipped layer's K/V come from the router's own normalisation in one
    product, equal to the layer's norm and projections; Llama's RMSNorm keeps its own path.
    The folded copy follows the backbone's weights too."""
    model = randomise_routers(tiny_model(examples, family, shortcuts=True))
    bb = model.backbone
    g = torch.Generator().manual_seed(2)
    ids, visible = pad(prompts_of(model, examples[:3]), model.tokenizer.pad_id, left=True)
    with torch.no_grad():
        cache, last, prev, pos = prefill(model, ids, visible)
        h = bb.layer_input(torch.randn(3, bb.hidden_size, generator=g)[:, None], pos[:, None])
        ctx = bb.context(h, pos[:, None], cache)
        folded = model.shortcuts.folded(bb)
        assert (folded[0].kv is not None) == (family == "gpt2")
        for layer, fold in enumerate(folded):
            normed, _, _ = fold.decide(h[:, 0])
            k, v = fill_kv(bb, fold, layer, h, normed, ctx)
            k0, v0 = bb.layer_kv(layer, h, ctx)
            assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
        if family == "gpt2":
            bb.layers[0].ln_1.weight.mul_(2.0)
            again = model.shortcuts.folded(bb)
            assert again is not folded
            normed, _, _ = again[0].decide(h[:, 0])
            assert torch.allclose(fill_kv(bb, again[0], 0, h, normed, ctx)[0], bb.layer_kv(0, h, ctx)[0], atol=1e-5)


@pytest.mark.parametrize("policy", ["fill", "skip"])
def test_gathering_and_running_every_row_give_the_same_answers(examples, family, policy):
    """Rows that disagree at a layer: gathered, or all run with the shortcut's output kept where
    a row skips; the answers and routes agree, and the measured choice is one of the two."""
    model = randomise_routers(tiny_model(examples, family, shortcuts=True), seed=3)
    prompts = prompts_of(model, examples[:8])
    mask = torch.rand(8, model.num_layers, generator=torch.Generator().manual_seed(0)) < 0.5  # rows disagree
    runs = {rows: generate(model, prompts, K=2, route=Route("hard", 0.5, policy, rows=rows, skip=mask), max_new_tokens=8)
            for rows in ("gather", "dense", "auto")}
    for rows in ("dense", "auto"):
        assert [g.tokens for g in runs[rows]] == [g.tokens for g in runs["gather"]], rows
        assert [g.ran for g in runs[rows]] == [g.ran for g in runs["gather"]], rows
        assert [g.flops for g in runs[rows]] == [g.flops for g in runs["gather"]], rows
    together = [[g.ran[step] for g in runs["gather"]] for step in range(3)]  # 2 thoughts and <eot>: every row takes them
    assert any(len({ran[layer] for ran in rows}) == 2 for rows in together for layer in range(model.num_layers)), \
        "some layer should see rows that disagree"
    assert 1 <= model.backbone._gather_from[8] <= 8


def test_the_fill_writes_the_keys_and_values_the_layer_itself_writes(examples, family):
    """layer_kv (a skipped layer's kv_policy "fill") against the real HF layer's own keys and
    values, decoding (folded: one product with the norm's weight inside) and with gradients
    (the layer's own modules); the fold follows the weights when they change."""
    model = tiny_model(examples, family)
    bb = model.backbone
    g = torch.Generator().manual_seed(5)
    ids, visible = pad(prompts_of(model, examples[:3]), model.tokenizer.pad_id, left=True)

    def check():
        with torch.no_grad():
            cache, _, _, pos = prefill(model, ids, visible)
            h = bb.layer_input(torch.randn(3, bb.hidden_size, generator=g)[:, None], pos[:, None])
            ctx = bb.context(h, pos[:, None], cache)
            own = [bb.run_layer(layer, h, ctx, cache)[1:] for layer in range(bb.num_layers)]
            decoding = [bb.layer_kv(layer, h, ctx) for layer in range(bb.num_layers)]
        training = [bb.layer_kv(layer, h, ctx) for layer in range(bb.num_layers)]
        for (k0, v0), (k1, v1), (k2, v2) in zip(own, decoding, training):
            assert torch.allclose(k0, k1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
            assert torch.allclose(k0, k2, atol=1e-5) and torch.allclose(v0, v2, atol=1e-5)

    check()
    with torch.no_grad():
        for block in bb.layers:
            norm = block.ln_1 if family == "gpt2" else block.input_layernorm
            norm.weight.mul_(1.5)
            (block.attn.c_attn if family == "gpt2" else block.self_attn.k_proj).weight.add_(0.1)
    check()


def test_a_decoding_cache_grows_in_place_and_a_fork_writes_its_own_copy(examples, family):
    """Decoding writes each new position into the cache's buffer (no copy of the cache per
    step); a fork shares what was cached and writes into a copy, so neither sees the other's
    new positions."""
    model = tiny_model(examples, family)
    prompts = prompts_of(model, examples[:2])
    ids, visible = pad(prompts, model.tokenizer.pad_id, left=True)
    with torch.inference_mode():
        cache, last, prev, pos = prefill(model, ids, visible)
        buffer = cache._store[0][0]
        assert cache.keys[0]._base is buffer or cache.keys[0].data_ptr() == buffer.data_ptr()
        child = cache.fork()
        parent_step = decode_step(model, model.thought_input(0, last), pos, cache, prev)
        assert cache._store[0][0] is buffer, "a step with room left writes into the same buffer"
        child_step = decode_step(model, model.thought_input(0, last), pos, child, prev)
        assert child._store[0][0] is not buffer
        assert torch.equal(parent_step.hidden, child_step.hidden)
        assert torch.equal(cache.keys[1], child.keys[1]) and cache.keys[1].shape[2] == ids.shape[1] + 1


def test_latent_step_input_is_P_of_the_previous_last_hidden_state(examples):
    model = tiny_model(examples)
    seen = []
    model.projection.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out.clone())))
    prompts = [prompt(model.tokenizer, e) for e in encoded(model, examples[:2])]
    generate(model, prompts, K=3, max_new_tokens=2)
    assert len(seen) == 3  # one P call per latent step
    from system15.engine import prefill

    ids, visible = pad(prompts, model.tokenizer.pad_id, left=True)
    with torch.no_grad():
        _, last, _, _ = prefill(model, ids, visible)
    assert torch.allclose(seen[0][0], last)  # step 1 reads P(h_L at <bot>)


def test_K_zero_is_answer_only_decoding(examples, family):
    """generate(K=0) equals greedy decoding of `question <bot> <eot>` by full recomputation."""
    from system15.backbone import positions_from_mask

    model = tiny_model(examples, family)
    tok = model.tokenizer
    for e in encoded(model, examples[:3]):
        gen = generate(model, [prompt(tok, e)], K=0, max_new_tokens=6)[0]
        seq = prompt(tok, e) + [tok.eot_id]
        ref = []
        with torch.no_grad():
            for _ in range(len(gen.tokens)):
                ids = torch.tensor([seq])
                vis = torch.ones_like(ids, dtype=torch.bool)
                final, _ = model.backbone.forward_full(model.backbone.embed(ids), positions_from_mask(vis), vis)
                nxt = int(model.backbone.head(final[0, -1]).argmax())
                ref.append(nxt)
                seq.append(nxt)
        assert gen.tokens == ref
        assert gen.thought_steps == 0 and gen.decoding_steps == len(gen.tokens)
