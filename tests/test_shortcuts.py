"""Routers and adapters (shortcuts.py): their shapes, what a fresh shortcut computes, the
hard choice against the threshold, the folded copy inference runs, and stage 2's cost weights."""

import math

import pytest
import torch

from system15.engine import Route
from system15.shortcuts import LayerShortcut, Shortcuts, compute_cost_weights
from tests.helpers import randomise_routers, tiny_model

WIDTH, BOTTLENECK, HIDDEN = 16, 4, 6


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, WIDTH, generator=g), torch.randn(rows, WIDTH, generator=g)


def test_router_and_adapters_have_the_documented_shapes():
    sc = LayerShortcut(WIDTH, BOTTLENECK, HIDDEN)
    h, h_prev = inputs(5)
    w, depth = sc.route(h)
    assert w.shape == (5, 1) and depth.shape == (5, BOTTLENECK)
    assert sc.step(h_prev).shape == (5, BOTTLENECK)
    assert sc.branch(h, depth, h_prev).shape == (5, WIDTH)
    assert sc.read_in.weight.shape == (HIDDEN + BOTTLENECK, WIDTH)  # R_l's hidden units, then g_l's bottleneck
    assert sc.write.weight.shape == (WIDTH, 2 * BOTTLENECK)  # g_l and g'_l's up-projections side by side
    w3, depth3 = sc.route(h[:, None].expand(5, 3, WIDTH))  # any leading shape: [B, T, d] in training
    assert w3.shape == (5, 3, 1) and depth3.shape == (5, 3, BOTTLENECK)
    layers = Shortcuts(3, WIDTH, BOTTLENECK, HIDDEN)
    assert len(layers.layers) == 3 and layers[2] is layers.layers[2]


def test_a_fresh_shortcut_passes_its_input_through_and_its_router_starts_closed():
    """`write` starts at zero, so g_l + g'_l is the identity ("skip the layer"); the router's
    score starts at sigmoid(-2) whatever the input, below any usual threshold."""
    sc = LayerShortcut(WIDTH, BOTTLENECK, HIDDEN)
    h, h_prev = inputs(4, seed=1)
    w, depth = sc.route(h)
    torch.testing.assert_close(sc.branch(h, depth, h_prev), h)
    torch.testing.assert_close(w, torch.full((4, 1), 1 / (1 + math.exp(2.0))))


def test_the_soft_mix_runs_from_the_full_layer_to_the_shortcut():
    sc = LayerShortcut(WIDTH, BOTTLENECK, HIDDEN)
    short, full = inputs(3, seed=2)
    torch.testing.assert_close(sc.mix(torch.zeros(3, 1), short, full), full)
    torch.testing.assert_close(sc.mix(torch.ones(3, 1), short, full), short)
    torch.testing.assert_close(sc.mix(torch.full((3, 1), 0.25), short, full), 0.25 * short + 0.75 * full)


@pytest.mark.parametrize("score, lam, skips", [(0.7, 0.6, True), (0.7, 0.8, False), (0.2, 0.1, True),
                                               (0.2, 0.5, False), (0.7, 0.0, True), (0.7, 1.0, False)])
def test_a_layer_is_skipped_exactly_where_the_routers_score_exceeds_the_threshold(score, lam, skips):
    """A router set to score `score` on every input: the folded decision (its logit against
    Route.threshold, no sigmoid) skips the layer iff score > lambda_depth."""
    shortcuts = Shortcuts(1, WIDTH, BOTTLENECK, HIDDEN)
    with torch.no_grad():
        shortcuts[0].score.bias.fill_(math.log(score / (1 - score)))  # weights are zero: the score is the bias
    h, _ = inputs(4, seed=3)
    w, _ = shortcuts[0].route(h)
    torch.testing.assert_close(w, torch.full((4, 1), score))
    (fold,) = shortcuts.folded()
    _, _, logits = fold.decide(h)
    assert [bool(x > Route("hard", lam).threshold) for x in logits.view(-1)] == [skips] * 4


def test_folded_shortcuts_compute_what_the_modules_do(examples):
    """Inference's folded router and adapters: the same functions as LayerShortcut's, and
    the logit threshold makes the same decision as sigmoid(logit) > lambda_depth."""
    model = randomise_routers(tiny_model(examples, "gpt2", shortcuts=True))
    width = model.backbone.hidden_size
    g = torch.Generator().manual_seed(1)
    h, h_prev = torch.randn(7, width, generator=g), torch.randn(7, width, generator=g)
    with torch.no_grad():
        for sc, fold in zip(model.shortcuts.layers, model.shortcuts.folded()):
            w, depth = sc.route(h)
            _, act, logits = fold.decide(h)
            assert torch.allclose(torch.sigmoid(logits), w, atol=1e-6)
            assert torch.allclose(fold.branch(h, act, h_prev), sc.branch(h, depth, h_prev), atol=1e-5)
            for lam in (0.0, 0.2, 0.5, 0.9, 1.0):
                ours = [x > Route("hard", lam).threshold for x in logits.view(-1).tolist()]
                assert ours == [bool(x > lam) for x in w.view(-1)] or lam in (0.0, 1.0)
            assert all(x > Route("hard", 0.0).threshold for x in logits.view(-1).tolist())
            assert not any(x > Route("hard", 1.0).threshold for x in logits.view(-1).tolist())


def test_folded_shortcuts_follow_the_weights(examples):
    """The folded copy is rebuilt when a parameter changes (an optimizer step, a load)."""
    model = tiny_model(examples, "gpt2", shortcuts=True)
    first = model.shortcuts.folded()
    assert model.shortcuts.folded() is first  # nothing changed: reused
    with torch.no_grad():
        model.shortcuts.layers[0].score.bias.add_(1.0)
    again = model.shortcuts.folded()
    assert again is not first
    assert torch.equal(again[0].score_bias, model.shortcuts.layers[0].score.bias)


def test_router_and_adapter_modules_are_what_runs_for_the_decision_and_the_skip():
    sc = LayerShortcut(WIDTH, BOTTLENECK, HIDDEN)
    assert sc.router_modules() == [sc.read_in, sc.score]
    assert sc.adapter_modules() == [sc.read_prev, sc.write]


def test_cost_weights_grow_with_depth_on_non_critical_steps_and_shrink_on_critical_ones():
    """docs/design.md: e = e_nc (1 + d) off the critical steps, e_c (1 - d/2) on them, d the
    relative depth (0 at the first layer, 1 at the last)."""
    critical = torch.tensor([[False, True]])
    e = compute_cost_weights(critical, 3, e_noncritical=2.0, e_critical=0.5)
    assert e.shape == (1, 2, 3)
    torch.testing.assert_close(e[0, 0], torch.tensor([2.0, 3.0, 4.0]))
    torch.testing.assert_close(e[0, 1], torch.tensor([0.5, 0.375, 0.25]))
    one = compute_cost_weights(critical, 1, e_noncritical=2.0, e_critical=0.5)  # one layer: depth 0
    torch.testing.assert_close(one[0, :, 0], torch.tensor([2.0, 0.5]))
