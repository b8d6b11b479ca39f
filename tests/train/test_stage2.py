"""Stage 2's training pass: the teacher-forced answer goes through each layer in one pass
(`stage2.tail_pass`) and must be the same function as decoding it one step at a time."""

import pytest
import torch

from system15.engine import Route, decode_step, prefill
from system15.layout import encode
from system15.train.stage2 import SOFT, ShortcutDistillation, run_steps

from tests.helpers import tiny_config, tiny_model


def stepwise(model, start, batch, K, route):
    """The reference: every latent step and every answer token through `decode_step`."""
    cache, last, prev, positions = start
    cache = cache.fork()
    tail = batch["tail"]
    states, logits, weights = [], [], []
    for t in range(K + tail.shape[1]):
        x = model.thought_input(t, last) if t < K else model.backbone.embed(tail[:, t - K])
        res = decode_step(model, x, positions, cache, prev, route)
        last, prev, positions = res.hidden, res.layers, positions + 1
        states.append(torch.stack(res.layers, 1))
        weights.append(res.weights)
        if t >= K:
            logits.append(model.backbone.head(res.hidden))
    states = torch.stack(states, 1)  # [B, T, L, d]
    return list(states.unbind(2)), torch.stack(logits, 1), None if weights[0] is None else torch.stack(weights, 1)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("route", [Route(), SOFT], ids=["full", "soft"])
def test_tail_in_one_pass_per_layer_equals_stepping_it(examples, family, K, route):
    torch.manual_seed(0)
    model = tiny_model(examples, family=family, shortcuts=True)
    for p in model.shortcuts.parameters():  # open routers and non-zero adapters: the step shortcut matters
        p.data.normal_(0, 0.3)
    objective = ShortcutDistillation(tiny_config(family, **{"architecture.K": K}))
    batch = objective.collate(model, [encode(model.tokenizer, e) for e in examples[:5]])
    assert batch["tail"].shape[1] > 2 and not batch["tail_visible"].all()  # answers of several lengths, padded
    with torch.no_grad():
        start = prefill(model, batch["ids"], batch["visible"])
        fast = run_steps(model, start, batch, K, route)
        slow = stepwise(model, start, batch, K, route)
    for a, b in zip(fast[0], slow[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)
    if route.mode == "soft":
        torch.testing.assert_close(fast[2], slow[2], rtol=1e-5, atol=1e-5)
        assert fast[2].shape == (5, K + batch["tail"].shape[1], model.num_layers)
    else:
        assert fast[2] is None and slow[2] is None


def test_std_scaled_error_does_not_grow_with_the_backbones_activations():
    """stage2.mse_scale=std: the stage-2 error is the same for states 100x larger (a
    pretrained backbone's, say), where docs/design.md's plain error grows 10^4x; it is the plain
    error over the full path's variance at each layer, taken over the valid steps only."""
    from system15.train.stage2 import layer_mse

    torch.manual_seed(0)
    full = [torch.randn(3, 5, 8) * s for s in (1.0, 4.0)]
    mix = [f + 0.1 * torch.randn_like(f) for f in full]
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 3:] = False
    full[1][0, 3:] = 1e3  # padding: must not move the scale
    plain, scaled = layer_mse(mix, full, valid, "none"), layer_mse(mix, full, valid, "std")
    big = layer_mse([m * 100 for m in mix], [f * 100 for f in full], valid, "std")
    torch.testing.assert_close(big, scaled)
    torch.testing.assert_close(layer_mse([m * 100 for m in mix], [f * 100 for f in full], valid, "none"), plain * 1e4, rtol=1e-4, atol=0)
    for layer in range(2):
        torch.testing.assert_close(scaled[..., layer], plain[..., layer] / full[layer][valid].var())


def test_std_scaled_error_trains_and_a_bad_scale_is_refused(examples):
    from system15.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stage2.mse_scale"):
        load_config(None, ["stage2.mse_scale=max"])
    model = tiny_model(examples)
    losses = {}
    for scale in ("none", "std"):
        config = tiny_config()
        config.stage2.mse_scale = scale
        obj = ShortcutDistillation(config)
        obj.prepare(model)
        torch.manual_seed(0)
        loss, metrics = obj.loss(model, obj.collate(model, [encode(model.tokenizer, e) for e in examples[:4]]))
        loss.backward()
        assert all(p.grad is not None for p in model.shortcuts.parameters() if p.requires_grad)
        model.zero_grad()
        losses[scale] = metrics["mse"]
    assert losses["std"] != losses["none"]


@pytest.mark.parametrize("method", ["latent", "system15"])
def test_equal_validation_keeps_the_earlier_checkpoint_but_stage_2_the_later(method, examples, tmp_path):
    """Validation scores accuracy alone; a later stage-2 checkpoint has trained its routers
    longer under the compute cost, so a tie goes to it. Every other stage keeps the earlier."""
    from system15.config import TrainConfig
    from system15.train import objective_for
    from system15.train.loop import fit

    model = tiny_model(examples)
    config = tiny_config()
    objective = objective_for(method, config)
    train = [encode(model.tokenizer, e) for e in examples]
    cfg = TrainConfig(steps=6, batch_size=4, warmup=1, eval_every=2)
    summary = fit(model, objective, train, cfg, tmp_path / method, validate=lambda m: 0.5, quiet=True)
    assert summary["best_step"] == {"latent": 2, "system15": 6}[method]
