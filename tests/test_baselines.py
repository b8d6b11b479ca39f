"""Baselines: pause tokens read no feedback; Coconut's curriculum and its model selection."""

import pytest
import torch

from system15.layout import encode
from system15.train.baselines import Coconut, Pause
from system15.train.objective import thought_forward

from conftest import tiny_config, tiny_model


def test_coconut_replaces_steps_stage_by_stage_and_selects_only_the_last_stage(examples):
    obj = Coconut(tiny_config(**{"baselines.coconut_stages": 2, "baselines.coconut_c": 1}))
    model = tiny_model(examples, thought="hidden")
    enc = [encode(model.tokenizer, e) for e in examples[:3]]
    tails = {}
    for step in (0, 9):
        obj.on_step(step, 10)
        batch = obj.collate(model, enc)
        tails[obj.stage] = (batch["K"], int(batch["tail_visible"].sum()))
    assert tails[1][0] == 1 and tails[2][0] == 2          # c thoughts per replaced step
    assert tails[1][1] > tails[2][1]                       # stage 1 still writes the later steps
    assert obj.eval_K(None) == 2
    assert not obj.selectable(5, 10) and obj.selectable(10, 10)


def test_pause_thoughts_ignore_the_hidden_state(examples):
    model = tiny_model(examples, thought="pause")
    h = torch.randn(2, model.backbone.hidden_size)
    a = model.thought_input(0, h)
    b = model.thought_input(0, h + 1.0)
    assert torch.equal(a, b) and Pause(tiny_config()).eval_K(None) == 2


@pytest.mark.parametrize("K", [0, 2])
def test_pause_loss_in_one_pass_equals_prefill_steps_and_teacher_forcing(examples, family, K):
    model = tiny_model(examples, family=family, thought="pause")
    for p in model.parameters():  # weights large enough that every input position shows in the loss
        torch.nn.init.normal_(p, 0, 0.3)
    objective = Pause(tiny_config(family, **{"baselines.pause_K": K}))
    batch = objective.collate(model, [encode(model.tokenizer, e) for e in examples[:5]])
    assert not batch["visible"].all() and not batch["tail_visible"].all()  # padded on both sides
    one_pass, _ = objective.loss(model, batch)
    stepped = thought_forward(model, batch, K).nll
    torch.testing.assert_close(one_pass, stepped, rtol=1e-5, atol=1e-6)
