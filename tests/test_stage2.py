"""Stage 2's training pass: the teacher-forced answer goes through each layer in one pass
(`stage2.tail_pass`) and must be the same function as decoding it one step at a time."""

import pytest
import torch

from system15.engine import Route, decode_step, prefill
from system15.layout import encode
from system15.train.stage2 import SOFT, ShortcutDistillation, run_steps

from conftest import tiny_config, tiny_model


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
    objective = ShortcutDistillation(tiny_config(family, **{"latent.K": K}))
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
