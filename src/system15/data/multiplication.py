"""Multi-digit multiplication in the layout of ../shared/data/mult (implicit-CoT data).

Numbers are written digit by digit, least significant first. For a x b with `digits`
digits each, the chain lists a times each digit of b (shifted by its position) and, after
every partial product but the first and the last, the running sum in parentheses:

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + ... #### 5 5 6 0 8 2 0 1

Partial product k (0-based) and the running sum after it are padded with zeros to
digits+1+k digits; the answer to 2*digits digits. Operands have no leading zero.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from .records import Example, Step


def _reversed_digits(value: int, width: int) -> str:
    """1234, 5 -> '4 3 2 1 0'."""
    return " ".join(str(value)[::-1].ljust(width, "0"))


def mult_example(a: int, b: int, digits: int, source: str = "") -> Example:
    """The example for a x b, labelled as parse_mult_line labels it: the first partial
    product is non-critical, every '+' step (which adds into the running sum) critical."""
    answer = _reversed_digits(a * b, 2 * digits)
    partials = [a * int(digit) * 10**k for k, digit in enumerate(str(b)[::-1])]
    first = _reversed_digits(partials[0], digits + 1)
    steps = [Step(first, first, critical=False)]
    running = partials[0]
    for k, partial in enumerate(partials[1:], 1):
        running += partial
        text = f"+ {_reversed_digits(partial, digits + 1 + k)}"
        if k == len(partials) - 1:
            steps.append(Step(text, answer, critical=True))
        else:
            total = _reversed_digits(running, digits + 1 + k)
            steps.append(Step(f"{text} ( {total} )", total, critical=True))
    question = f"{_reversed_digits(a, digits)} * {_reversed_digits(b, digits)}"
    return Example(question, tuple(steps), answer, source)


def generate_mult(n: int, digits: int, seed: int, *, exclude: Collection[str] = ()) -> list[Example]:
    """n examples with distinct random operands, the same for the same seed, whose
    questions are not in `exclude` (pass the valid/test questions to keep train apart)."""
    if digits < 1 or n < 0:
        raise ValueError(f"need digits >= 1 and n >= 0, got digits={digits}, n={n}")
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    seen = set(exclude)
    examples: list[Example] = []
    for _ in range(20 * n + 1000):
        if len(examples) == n:
            break
        a, b = rng.randint(low, high), rng.randint(low, high)
        example = mult_example(a, b, digits, f"generated:mult{digits}:seed{seed}:{len(examples)}")
        if example.question not in seen:
            seen.add(example.question)
            examples.append(example)
    if len(examples) < n:
        raise ValueError(f"only {len(examples)} distinct {digits}-digit products found, {n} asked for")
    return examples
