"""The synthetic task: correct arithmetic, labels from the graph, deterministic, disjoint splits."""

import operator
import re

import pytest

from system15.data import SyntheticTask, answers_match, split_of, synthetic_splits

_DEFINITION = re.compile(r"([a-z]+)=(\d+|[a-z0-9]+[-+*][a-z0-9]+)")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _value(rhs, env):
    """A definition's value: a number, or 'x op y' over numbers and defined names."""
    if rhs.isdigit():
        return int(rhs)
    left, op, right = re.fullmatch(r"([a-z0-9]+)([-+*])([a-z0-9]+)", rhs).groups()
    return _APPLY[op](*(int(x) if x.isdigit() else env[x] for x in (left, right)))


def _check_example(example, task):
    """Replays the question; checks the chain, the labels and the ranges against it."""
    *definitions, asked = re.fullmatch(r"(.*)\. ([a-z]+)\?", example.question).groups()
    env, given, used = {}, set(), set()
    results = []
    for definition in definitions[0].split(","):
        name, rhs = _DEFINITION.fullmatch(definition).groups()
        if rhs.isdigit():
            assert 0 <= int(rhs) <= task.max_operand
            given.add(name)
        else:
            operands = re.findall(r"[a-z]+", rhs)
            assert set(operands) <= env.keys()  # defined before use
            used.update(operands)
            results.append((name, operands))
        env[name] = _value(rhs, env)
    assert asked == results[-1][0]
    assert set(env) - used == {asked}  # every number and every result is consumed
    assert len(example.steps) == len(results) == task.n_steps
    for step, (name, operands) in zip(example.steps, results, strict=True):
        expr, result = re.fullmatch(r"<<(.+)=(\d+)>>", step.text).groups()
        assert _value(expr, {}) == int(result) == int(step.result) == env[name]
        assert 0 <= int(result) <= task.max_result
        assert step.critical == any(operand not in given for operand in operands)
    assert example.answer == example.steps[-1].result and answers_match(str(env[asked]), example.answer)


@pytest.mark.parametrize(
    "task",
    [
        SyntheticTask(),
        SyntheticTask(n_steps=1),
        SyntheticTask(n_steps=9, p_independent=0.6, ops="+*", max_result=200),
        SyntheticTask(n_steps=30, max_operand=3, max_result=20, ops="-"),
        SyntheticTask(p_independent=1.0),
    ],
)
def test_chains_are_consistent(task):
    for example in task.generate(300, seed=3):
        _check_example(example, task)


def test_example_layout():
    example = SyntheticTask().generate(1, seed=0)[0]
    assert re.fullmatch(r"[a-z]=\d,[a-z]=\d,.*\. [a-z]\?", example.question)
    assert example.cot.startswith("<<") and example.source == "synthetic:0"


def test_deterministic_by_seed():
    task = SyntheticTask()
    assert task.generate(50, seed=1) == task.generate(50, seed=1)
    assert task.generate(50, seed=1) != task.generate(50, seed=2)
    assert task.generate(20, seed=1) == task.generate(50, seed=1)[:20]


def _expected_non_critical_fraction(n_steps, p):
    """Exact mean share of independent steps under the generator's rules."""
    one_open, independent = 1.0, 1.0  # after step 1: one open result; step 1 is independent
    for number in range(2, n_steps + 1):
        chance = one_open * p if number < n_steps else 0.0
        independent += chance
        one_open = 1.0 - chance  # two open after an independent step, one after any other
    return independent / n_steps


@pytest.mark.parametrize("n_steps, p", [(4, 0.3), (6, 0.5), (3, 0.0)])
def test_label_proportions(n_steps, p):
    steps = [s for e in SyntheticTask(n_steps=n_steps, p_independent=p).generate(4000, seed=0) for s in e.steps]
    non_critical = sum(not s.critical for s in steps) / len(steps)
    assert abs(non_critical - _expected_non_critical_fraction(n_steps, p)) < 0.015
    assert any(s.critical for s in steps)


def test_independent_and_derived_patterns():
    assert {tuple(s.critical for s in e.steps) for e in SyntheticTask(p_independent=0.0).generate(50, 0)} == {
        (False, True, True, True)
    }
    assert {tuple(s.critical for s in e.steps) for e in SyntheticTask(p_independent=1.0).generate(50, 0)} == {
        (False, False, True, True)
    }


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_steps": 0}, "n_steps"),
        ({"p_independent": 1.5}, "p_independent"),
        ({"ops": "+/"}, "ops"),
        ({"ops": ""}, "ops"),
        ({"max_result": 5}, "max_result"),
        ({"max_operand": 0}, "max_operand"),
        ({"n_steps": 2.5}, "n_steps"),
        ({"p_independent": "0.3"}, "p_independent"),
    ],
)
def test_invalid_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticTask(**kwargs)


def test_splits_are_disjoint_sized_and_stable():
    task = SyntheticTask()
    splits = synthetic_splits(task, 2000, 200, 200, seed=5)
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 2000, "valid": 200, "test": 200}
    questions = {name: [e.question for e in examples] for name, examples in splits.items()}
    assert all(len(set(qs)) == len(qs) for qs in questions.values())
    assert not set(questions["train"]) & (set(questions["valid"]) | set(questions["test"]))
    assert not set(questions["valid"]) & set(questions["test"])
    assert all(split_of(q) == name for name, qs in questions.items() for q in qs)
    smaller = synthetic_splits(task, 100, 0, 50, seed=5)
    assert smaller["train"] == splits["train"][:100] and smaller["test"] == splits["test"][:50]


def test_too_small_task_is_reported():
    with pytest.raises(ValueError, match="too few distinct questions"):
        synthetic_splits(SyntheticTask(n_steps=1, max_operand=1, max_result=1, ops="+"), 10, 10, 10, seed=0)
