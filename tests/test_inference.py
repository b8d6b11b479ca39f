"""Answering with a trained model (inference.py): the K and route a model decodes with, the
length check, and what an Answer reports about the text, the value and the route taken."""

import json

import pytest
import torch

from system15.data import DataError, Example, read_examples
from system15.engine import FULL, Route
from system15.inference import check_length, resolve_K, resolve_route
from tests.helpers import tiny_model


def scripted(model, text: str):
    """Make the head write `text` then <eos>, whatever the input (one-hot logits, call by call)."""
    tok = model.tokenizer
    script, calls = tok.encode(text) + [tok.eos_id], [0]

    def head(h):
        logits = torch.zeros(*h.shape[:-1], len(tok))
        logits[..., script[min(calls[0], len(script) - 1)]] = 1.0
        calls[0] += 1
        return logits
    model.backbone.head = head
    return model


def test_K_is_the_models_own_unless_given(examples):
    model = tiny_model(examples)
    model.spec.K = 3
    assert resolve_K(model, None) == 3
    assert resolve_K(model, 0) == 0 and resolve_K(model, 5) == 5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_K_that_is_not_a_count_is_refused(examples, bad):
    with pytest.raises(ValueError, match=r"K: must be an integer >= 0, got"):
        resolve_K(tiny_model(examples), bad)


def test_a_model_without_thought_steps_takes_only_K_zero(examples):
    model = tiny_model(examples, thought=None)
    model.method = "cot"
    assert resolve_K(model, 0) == 0
    with pytest.raises(ValueError, match="this cot model has no thought steps; only K=0"):
        resolve_K(model, 2)


def test_the_route_is_the_models_own_unless_overridden(examples):
    model = tiny_model(examples, shortcuts=True)
    model.spec.lambda_depth, model.spec.kv_policy = 0.7, "skip"
    assert resolve_route(model, None, None, True) == Route("hard", 0.7, "skip")
    assert resolve_route(model, 0.2, "fill", True) == Route("hard", 0.2, "fill")
    assert resolve_route(model, 0.2, "fill", False) == FULL  # shortcuts off: every layer runs
    assert resolve_route(tiny_model(examples), 0.2, "skip", True) == FULL  # nothing to route with


def test_a_kv_policy_other_than_fill_or_skip_is_refused(examples):
    for model in (tiny_model(examples), tiny_model(examples, shortcuts=True)):
        with pytest.raises(ValueError, match="kv_policy: must be fill or skip, got 'drop'"):
            resolve_route(model, None, "drop", True)


def test_a_question_that_just_fits_passes_and_one_more_position_is_refused(examples):
    """need = prompt + (K thought steps + <eot>) + new tokens, against the backbone's positions."""
    model = tiny_model(examples)
    limit = model.backbone.max_positions
    example = Example("q", (), "", "mine.jsonl:7")
    ids = [5] * (limit - 10)
    check_length(model, example, ids, 3, 6)  # limit - 10 + 4 + 6 = limit
    with pytest.raises(DataError, match=rf"mine.jsonl:7: question: {limit - 10} tokens, with 3 thought steps and 7 new "
                                        rf"tokens, need {limit + 1} positions; the backbone has {limit}"):
        check_length(model, example, ids, 3, 7)
    check_length(model, example, ids, None, 10)  # CoT: no thought steps, no <eot> fed
    with pytest.raises(DataError, match=rf"need {limit + 1} positions"):
        check_length(model, example, ids, None, 11)


def test_answer_reports_the_text_the_value_and_each_steps_route(examples):
    model = scripted(tiny_model(examples), "#### 42")
    (a,) = model.answer(["a=40,b=2,c=a+b. c?"], K=2, max_new_tokens=8)
    assert (a.question, a.text, a.answer, a.value, a.source) == ("a=40,b=2,c=a+b. c?", "#### 42", "42", 42, "question 1")
    assert isinstance(a.value, int)
    assert (a.thought_steps, a.decoding_steps) == (2, 6)  # 2 thoughts, "#### ", "4", "2", <eos>
    assert [r.kind for r in a.routes] == ["thought"] * 2 + ["token"] * 4
    assert [r.token for r in a.routes] == [None, None, "#### ", "4", "2", ""]
    assert [r.critical for r in a.routes] == [None, None, False, True, True, False]  # digits are critical
    assert all(r.ran == [True] * model.num_layers and r.skipped == 0 for r in a.routes) and a.flops > 0


def test_an_answer_without_a_number_or_a_marker_has_no_value(examples):
    (fraction,) = scripted(tiny_model(examples), "#### 2.5").answer(["q?"], K=0)
    assert (fraction.answer, fraction.value) == ("2.5", 2.5)
    (words,) = scripted(tiny_model(examples), "#### ab").answer(["q?"], K=0)
    assert (words.answer, words.value) == ("ab", None)
    (none,) = scripted(tiny_model(examples), "42").answer(["q?"], K=0)
    assert (none.text, none.answer, none.value) == ("42", None, None)


def test_answers_come_back_in_order_whatever_the_batch_size(examples):
    model = tiny_model(examples)
    one = model.answer(examples[:4], K=2, batch_size=1, max_new_tokens=4)
    many = model.answer(examples[:4], K=2, batch_size=3, max_new_tokens=4)
    assert [a.source for a in one] == [e.source for e in examples[:4]]
    assert [(a.text, a.decoding_steps, a.flops) for a in many] == [(a.text, a.decoding_steps, a.flops) for a in one]


def test_what_is_not_a_list_of_questions_is_refused(examples):
    model = tiny_model(examples)
    with pytest.raises(TypeError, match="takes a list of questions"):
        model.answer("a=1. a?")
    with pytest.raises(ValueError, match=r"question 2: expected a non-empty string, got '  '"):
        model.answer(["a=1. a?", "  "])
    with pytest.raises(ValueError, match="batch_size: must be an integer >= 1, got 0"):
        model.answer(["a=1. a?"], batch_size=0)


def test_answer_labels_thought_steps_where_the_chain_is_known(examples):

    model = tiny_model(examples)
    model.spec.K = 2
    a = model.answer(examples[:1], max_new_tokens=3)[0]
    assert [r.critical for r in a.routes[:2]] == [any(s.critical for s in examples[0].steps[:1]),
                                                  any(s.critical for s in examples[0].steps[1:])]


def test_a_question_longer_than_the_backbone_names_its_line_and_the_limit(tmp_path, examples):

    model = tiny_model(examples, **{"backbone.n_positions": 64})
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "a=1,b=2,c=a+b. c?", "answer": 3}) + "\n"
                    + json.dumps({"question": "a=1," * 30 + " a?", "answer": 1}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: question: \d+ tokens.* need \d+ positions; the backbone has 64"):
        model.answer(read_examples(data), K=2, max_new_tokens=8)


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True])
def test_a_threshold_outside_the_unit_interval_is_refused(examples, bad):

    for model in (tiny_model(examples), tiny_model(examples, shortcuts=True)):
        with pytest.raises(ValueError, match="lambda_depth: must lie in"):
            model.answer(["a=1. a?"], K=1, lambda_depth=bad)
