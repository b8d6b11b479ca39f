"""Baselines: pause tokens read no feedback; Coconut's curriculum and its model selection."""

import dataclasses
import json

import pytest
import torch

from system15.layout import IGNORE, encode
from system15.train import loop
from system15.train.loop import fit
from system15.train.optim import build_optimizer
from system15.train.baselines import Coconut, Pause
from system15.train.objective import thought_forward

from tests.helpers import tiny_config, tiny_model
from tests.helpers.tiny_run import tiny_config as run_config
from tests.helpers.tiny_run import tiny_setup


def coconut(**settings):
    return Coconut(tiny_config(**{f"baselines.coconut_{k}": v for k, v in settings.items()}))


def test_coconut_stages_then_a_final_stage_that_replaces_every_step(examples):
    """Stage s <= S replaces the first s steps by s*c thoughts; stage S+1 replaces all of them
    by S*c thoughts (the official max_latent_stage and pad_latent_to_max)."""
    obj = coconut(stages=2, c=2)
    model = tiny_model(examples, thought="hidden")
    enc = [encode(model.tokenizer, e) for e in examples[:3]]  # three reasoning steps each
    seen = {}
    for step in (0, 4, 9):  # 10 steps in three equal shares
        obj.on_step(step, 10)
        batch = obj.collate(model, enc)
        seen[obj.stage] = (batch["K"], int(batch["tail_visible"].sum()))
    assert sorted(seen) == [1, 2, 3] and obj.final == 3
    assert [seen[s][0] for s in (1, 2, 3)] == [2, 4, 4]           # c thoughts per replaced step, capped at S*c
    assert seen[1][1] > seen[2][1] > seen[3][1]                    # each stage writes fewer steps
    answers = sum(len(e.answer) for e in enc)
    assert seen[3][1] == answers + len(enc)                        # final stage: <eot> and the answer only
    assert obj.eval_K(None) == 4


def test_coconut_labels_cover_the_remaining_steps_and_the_answer_only(examples):
    """What the loss covers: no label on the question or the thoughts (they are not in the
    tail), none on the fed <eot>; every token of the remaining steps and of the answer."""
    obj = coconut(stages=2, c=1)
    model = tiny_model(examples, thought="hidden")
    e = encode(model.tokenizer, examples[0])
    obj.on_step(0, 30)  # stage 1: the first step replaced
    batch = obj.collate(model, [e])
    labels = batch["labels"][0]
    wanted = [i for step in e.steps[1:] for i in step] + e.answer
    assert labels[labels != IGNORE].tolist() == wanted
    assert batch["tail"][0, 0] == model.tokenizer.eot_id and len(labels) == len(wanted) + 1  # <eot> fed, unlabelled


def test_coconut_stage_steps_fix_the_stage_length_and_the_final_stage_takes_the_rest():
    obj = coconut(stages=2, stage_steps=3)
    assert [obj._stage_at(s, 20) for s in range(8)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert obj._stage_at(19, 20) == 3
    assert [s for s in range(20) if obj.resets_optimizer(s, 20)] == [3, 6]
    assert not coconut(stages=2, stage_steps=3, reset="none").resets_optimizer(3, 20)


def test_coconut_selects_only_models_of_the_final_stage():
    obj = coconut(stages=2)
    assert [obj.selectable(s, 9) for s in (3, 6, 7, 9)] == [False, False, True, True]


@pytest.mark.parametrize("reset, steps_counted", [("stage", 1), ("none", 3)])
def test_coconut_optimizer_is_fresh_after_a_stage_boundary(tmp_path, monkeypatch, reset, steps_counted):
    """Through the real loop: 3 steps, the final stage from step 2 on. With the reset, AdamW's
    state at the end has counted one step (the final stage's); without it, all three."""
    config = run_config(steps=3, eval_every=3)
    config = dataclasses.replace(config, baselines=dataclasses.replace(
        config.baselines, coconut_stages=1, coconut_c=1, coconut_stage_steps=2, coconut_reset=reset))
    model, _, train, _ = tiny_setup(config)
    made = []

    def spy(*args, **kwargs):
        made.append(build_optimizer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "build_optimizer", spy)
    fit(model, Coconut(config), train, config.stage("cot"), tmp_path / reset, quiet=True)  # 3 steps
    opt = made[0][0]
    counts = {int(s["step"]) for s in opt.state.values()}
    assert counts == {steps_counted}
    log = [json.loads(line) for line in (tmp_path / reset / "log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log if "stage" in e] == [1, 1, 2]


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
