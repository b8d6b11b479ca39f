"""The record types every task is read into, plus the answer and label helpers that
only need the text of a record (no file format)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

ANSWER_MARKER = "####"

# An operand inside a calculator note: "12", "1,000", "0.5", ".5". Signs are left out on
# purpose: in "10-3" the '-' is the operator, so operands are compared by absolute value.
_OPERAND = re.compile(r"[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?|\.[0-9]+")
# What parse_number accepts once commas and '$' are gone. No exponents: Fraction("1e999999")
# would build a huge integer, and model output should not be able to stall an evaluation.
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")


class DataError(ValueError):
    """Bad input, located precisely enough to fix it by hand.

    The message reads '<path>:<line>: <field>: <what is wrong>' (line 1-based), or
    '<path>: <field>: <what is wrong>' when no single line is to blame.
    """

    def __init__(self, path: str, line: int | None, field: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}")

    @classmethod
    def at(cls, source: str, field: str, problem: str) -> "DataError":
        """The error for an example whose `source` is '<path>:<line>', or another label
        ('synthetic:<index>' reads as such, 'question 3' as a path without a line)."""
        path, _, line = source.rpartition(":")
        if line.isdigit() and path:
            return cls(path, int(line), field, problem)
        return cls(source or "<question>", None, field, problem)


@dataclass(frozen=True)
class Step:
    """One step of a chain of thought.

    `text` is the step exactly as written in the chain, `result` its result as text, and
    `critical` is True when the step uses an earlier step's result (docs/design.md, "Critical
    and non-critical steps").
    """

    text: str
    result: str
    critical: bool


@dataclass(frozen=True)
class Example:
    """A question, its reasoning steps and the gold answer; `source` says where it came
    from ('<path>:<line>' or 'synthetic:<index>') so that errors downstream can point back."""

    question: str
    steps: tuple[Step, ...]
    answer: str
    source: str = ""

    @property
    def cot(self) -> str:
        """The chain of thought as one string, steps separated by single spaces."""
        return " ".join(step.text for step in self.steps)

    @property
    def text(self) -> str:
        """Question, chain of thought and answer as one line of text (a scratch model's
        character tokenizer is built over these)."""
        return f"{self.question} {self.cot} #### {self.answer}"


def parse_number(text: str) -> Fraction | None:
    """The exact value of `text` as written in answers and notes, or None.

    Commas, a leading '$' and a trailing '.' are ignored ("$1,000." -> 1000), and simple
    fractions such as "3/4" (which GSM8K uses as a note result) are accepted. Fraction
    keeps the comparison exact, so "18.0" equals "18" without float rounding.
    """
    cleaned = text.strip().replace(",", "").removeprefix("$").removesuffix(".").strip()
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted answer counts as correct: numerically when both sides are
    numbers ("18.0" == "18", "1,000" == "1000"), otherwise as whitespace-normalised text
    (multiplication answers are digit sequences like "5 5 6 0")."""
    if predicted is None:
        return False
    predicted_value, gold_value = parse_number(predicted), parse_number(gold)
    if predicted_value is not None and gold_value is not None:
        return predicted_value == gold_value
    return predicted.split() == gold.split()


def extract_answer(generated_text: str) -> str | None:
    """The answer a model wrote: the text after the last '####', stripped; None when
    there is no marker or nothing follows it."""
    _, marker, tail = generated_text.rpartition(ANSWER_MARKER)
    answer = tail.strip()
    return answer if marker and answer else None


def operands(expr: str) -> set[Fraction]:
    """The numbers an expression reads, by absolute value (see `_OPERAND`)."""
    return {parse_number(match) for match in _OPERAND.findall(expr)}


def note_operands(step_text: str) -> frozenset[Fraction] | None:
    """What a calculator-note step ('<<16-3-4=9>>') reads; None for a step written otherwise."""
    if not (step_text.startswith("<<") and step_text.endswith(">>") and "=" in step_text):
        return None
    return frozenset(operands(step_text[2:-2].rpartition("=")[0]))


def label_equations(exprs_results: list[tuple[str, str]]) -> list[bool]:
    """Critical labels for a chain of (expression, result) equations.

    Step i is critical when one of its operands equals, numerically, the result of an
    earlier step j < i; that is the only trace an earlier step leaves in GSM8K notes.
    Operands and results are compared by absolute value (see `_OPERAND`); results that are
    not numbers (or empty, for notes without '=') can never be matched.
    """
    labels: list[bool] = []
    earlier: set[Fraction] = set()
    for expr, result in exprs_results:
        labels.append(bool(operands(expr) & earlier))
        value = parse_number(result)
        if value is not None:
            earlier.add(abs(value))
    return labels
