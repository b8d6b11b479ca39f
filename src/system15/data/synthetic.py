"""The built-in default task: short arithmetic chains whose step labels are known exactly.

A question declares given numbers as variables and defines one new variable per step, in
order (definition before use), then asks for the last one:

    question: "a=9,b=3,c=a+b,d=c-2,e=d-9. e?"
    chain:    "<<9+3=12>> <<12-2=10>> <<10-9=1>>"    answer: "1"

Step kinds, which give the labels (from the generator's own graph, not numeric matching):
- independent (non-critical): both operands are fresh given variables ("a=9,b=3,c=a+b");
- derived (critical): one operand is the open result, the other a constant written inline
  ("d=c-2" or "d=2*c");
- combining (critical): both operands are open results ("h=d+g").
Every result is used, so the last result is the answer. At most two results are open: step
1 is independent; a later step is independent with probability p_independent when exactly
one result is open and it is not the last step; when two are open, the next step combines
them. Constants are drawn from 0..max_operand (0 keeps every single-result step feasible,
e.g. v+0); operands, operator and order are resampled until the result is an integer in
0..max_result. Only combining can be infeasible (e.g. ops="+" with two large results); the
chain is then drawn again.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

from .records import Example, Step

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_MAX_CHAIN_DRAWS = 1000
_SPLITS = ("train", "valid", "test")

Operand = tuple[str, int]  # (how it is written in the question, value)


def _variable_names() -> Iterator[str]:
    """a, b, ..., z, aa, ab, ...: enough names for chains of any length."""
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            yield "".join(letters)


@dataclass
class SyntheticTask:
    """Settings of the synthetic chains (see the module docstring for the rules)."""

    n_steps: int = 4
    max_operand: int = 9
    max_result: int = 99
    p_independent: float = 0.3
    ops: str = "+-*"

    def __post_init__(self) -> None:
        for name in ("n_steps", "max_operand", "max_result"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {self.n_steps}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be at least 1, got {self.max_operand}")
        if self.max_result < self.max_operand:
            raise ValueError(f"max_result must be at least max_operand ({self.max_operand}), got {self.max_result}")
        if not isinstance(self.p_independent, (int, float)) or not 0 <= self.p_independent <= 1:
            raise ValueError(f"p_independent must be in [0, 1], got {self.p_independent}")
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set(_APPLY):
            raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {self.ops!r}")

    def generate(self, n: int, seed: int) -> list[Example]:
        """n examples, the same for the same seed (duplicate questions are possible)."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        return list(itertools.islice(self.stream(seed), n))

    def stream(self, seed: int) -> Iterator[Example]:
        """An endless, seed-determined sequence of examples; generate() takes its prefix."""
        rng = random.Random(seed)
        for index in itertools.count():
            yield self._example(rng, index)

    def _example(self, rng: random.Random, index: int) -> Example:
        for _ in range(_MAX_CHAIN_DRAWS):
            built = self._chain(rng)
            if built is not None:
                definitions, steps = built
                question = f"{','.join(definitions)}. {definitions[-1].partition('=')[0]}?"
                return Example(question, tuple(steps), steps[-1].result, f"synthetic:{index}")
        raise ValueError(f"{self} cannot build chains: results cannot be combined within max_result")

    def _chain(self, rng: random.Random) -> tuple[list[str], list[Step]] | None:
        """(question definitions, steps), or None when two open results cannot be combined."""
        names = _variable_names()
        definitions: list[str] = []
        steps: list[Step] = []
        open_results: list[Operand] = []
        for number in range(1, self.n_steps + 1):
            is_last = number == self.n_steps
            if len(open_results) == 2:
                picked = self._combining_step(rng, *open_results)
                if picked is None:
                    return None
                open_results.clear()
                critical = True
            elif not open_results or (not is_last and rng.random() < self.p_independent):
                picked = self._independent_step(rng, names, definitions)
                critical = False
            else:
                picked = self._derived_step(rng, open_results.pop())
                critical = True
            (left, left_value), op, (right, right_value) = picked
            value = _APPLY[op](left_value, right_value)
            name = next(names)
            definitions.append(f"{name}={left}{op}{right}")
            steps.append(Step(f"<<{left_value}{op}{right_value}={value}>>", str(value), critical))
            open_results.append((name, value))
        return definitions, steps

    def _in_range(self, value: int) -> bool:
        return 0 <= value <= self.max_result

    def _constant(self, rng: random.Random) -> int:
        return rng.randint(0, self.max_operand)

    def _independent_step(
        self, rng: random.Random, names: Iterator[str], definitions: list[str]
    ) -> tuple[Operand, str, Operand]:
        """Two constants, declared in the question as fresh given variables."""
        while True:
            x, y, op = self._constant(rng), self._constant(rng), rng.choice(self.ops)
            if self._in_range(_APPLY[op](x, y)):
                break
        left, right = (next(names), x), (next(names), y)
        definitions += [f"{left[0]}={x}", f"{right[0]}={y}"]
        return left, op, right

    def _derived_step(self, rng: random.Random, result: Operand) -> tuple[Operand, str, Operand]:
        """The open result and an inline constant, in either order."""
        while True:
            constant_value = self._constant(rng)
            constant = (str(constant_value), constant_value)
            left, right = (result, constant) if rng.random() < 0.5 else (constant, result)
            op = rng.choice(self.ops)
            if self._in_range(_APPLY[op](left[1], right[1])):
                return left, op, right

    def _combining_step(
        self, rng: random.Random, first: Operand, second: Operand
    ) -> tuple[Operand, str, Operand] | None:
        """Both open results, with an operator and order that keep the result in range."""
        options = [
            (left, op, right)
            for op in self.ops
            for left, right in ((first, second), (second, first))
            if self._in_range(_APPLY[op](left[1], right[1]))
        ]
        return rng.choice(options) if options else None


def split_of(question: str) -> str:
    """The split a synthetic question belongs to, fixed by a hash of its text: test and
    valid get 1/20 of all questions each, train the rest. Splits are thus disjoint whatever
    their sizes and seeds, and each split's content does not depend on the others' sizes."""
    digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 20
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def synthetic_splits(
    task: SyntheticTask, n_train: int, n_valid: int, n_test: int, seed: int
) -> dict[str, list[Example]]:
    """Train, valid and test examples with distinct questions (within and across splits).

    Examples are drawn from task.stream(seed) and routed by split_of(); a split takes the
    first unseen questions routed to it, so asking for fewer examples gives a prefix.
    """
    wanted = {"train": n_train, "valid": n_valid, "test": n_test}
    if min(wanted.values()) < 0:
        raise ValueError(f"split sizes must be non-negative, got {wanted}")
    splits: dict[str, list[Example]] = {name: [] for name in _SPLITS}
    seen: set[str] = set()
    budget = 100 * max(wanted.values()) + 10_000

    def missing() -> bool:
        return any(len(splits[name]) < size for name, size in wanted.items())

    stream = task.stream(seed)
    for _ in range(budget):
        if not missing():
            break
        example = next(stream)
        if example.question not in seen:
            seen.add(example.question)
            name = split_of(example.question)
            if len(splits[name]) < wanted[name]:
                splits[name].append(example)
    if missing():
        got = {name: len(examples) for name, examples in splits.items()}
        raise ValueError(f"{task} has too few distinct questions: found {got} of {wanted} after {budget} draws")
    return splits
