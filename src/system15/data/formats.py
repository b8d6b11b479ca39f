"""Readers and writers for the on-disk layouts (docs/data.md).

- "gsm8k": JSON lines, in either of two layouts:
  - {"question", "cot", "answer"} (this project's own): `cot` is optional, and is either
    `<<expr=result>>` equations (a string, or a list of them) or plain-text steps (a list of
    strings, or one string with a step per line), which may carry a per-step `critical`
    list of booleans; `answer` is the final answer alone;
  - GSM8K's {"question", "answer": "... <<48/2=24>>24 ...\\n#### 72"}: the steps are the
    calculator notes. Evaluation files may give a bare number as the answer.
- "aug": GSM8K-Aug, "question||<<16-3-4=9>> <<9*2=18>> #### 18"; the chain may be empty.
- "mult": "5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + ... #### 5 5 6 0 8 2 0 1".

Calculator notes are taken as they come rather than rejected, so that no real line is lost:
a note is split at its last '='; a note without '=' keeps its whole text as the expression
and an empty result (no later step can then match it). Units or other words inside a note
do not matter, because operands are found as numbers inside the expression. In GSM8K answer
prose a stray '<<' without '>>' is ordinary text; in an "aug" chain every token must be a note.

Multiplication labels: the first partial product is computed from the operands alone, so it
is non-critical. Every later "+ ..." step adds its partial product into the running sum of
the earlier steps (shown in "( ... )", or, for the last step, given as the answer), so it is
critical. A "+" step's result is its running sum; the last step's result is the answer.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .records import ANSWER_MARKER, DataError, Example, Step, label_equations, note_operands, parse_number

FORMATS = ("gsm8k", "aug", "mult")

_NOTE_IN_PROSE = re.compile(r"<<(.*?)>>")
_NOTE_IN_CHAIN = re.compile(r"\s*(<<.*?>>)")
_DIGITS = r"[0-9](?: [0-9])*"
_MULT_QUESTION = re.compile(r"\s*[0-9](?:\s+[0-9])*\s*\*\s*[0-9](?:\s+[0-9])*\s*")
_PARTIAL = re.compile(_DIGITS)
_PARTIAL_AND_SUM = re.compile(rf"({_DIGITS}) \( ({_DIGITS}) \)")


# ---------------------------------------------------------------- calculator notes


def _split_note(text: str) -> tuple[str, str]:
    """'<<16-3-4=9>>' -> ('16-3-4', '9'); a note without '=' has an empty result."""
    expr, equals, result = text[2:-2].rpartition("=")
    return (expr, result.strip()) if equals else (text[2:-2], "")


def _steps_from_notes(notes: list[str]) -> tuple[Step, ...]:
    """Steps for a list of '<<expr=result>>' notes, labelled by label_equations."""
    pairs = [_split_note(note) for note in notes]
    labels = label_equations(pairs)
    return tuple(Step(note, result, critical) for note, (_, result), critical in zip(notes, pairs, labels, strict=True))


def _chain_notes(chain: str, path: str, lineno: int) -> list[str]:
    """The notes of an "aug" chain, which must consist of notes and whitespace only."""
    notes: list[str] = []
    position, end = 0, len(chain.rstrip())
    while position < end:
        match = _NOTE_IN_CHAIN.match(chain, position)
        if match is None:
            found = chain[position:end].strip()[:30]
            raise DataError(path, lineno, f"equation {len(notes) + 1}", f"expected '<<expr=result>>', found {found!r}")
        notes.append(match.group(1))
        position = match.end()
    return notes


# ---------------------------------------------------------------- line layouts


def _split_line(line: str, path: str, lineno: int) -> tuple[str, str, str]:
    """'question||chain #### answer' -> (question, chain, answer), line ending removed."""
    question, separator, rest = line.rstrip("\r\n").partition("||")
    if not separator:
        raise DataError(path, lineno, "separator ||", "missing '||' between the question and the chain")
    if not question.strip():
        raise DataError(path, lineno, "question", "empty")
    markers = rest.count(ANSWER_MARKER)
    if markers != 1:
        raise DataError(path, lineno, "answer", f"expected one '{ANSWER_MARKER}' before the answer, found {markers}")
    chain, _, answer = rest.partition(ANSWER_MARKER)
    if not answer.strip():
        raise DataError(path, lineno, "answer", f"nothing after '{ANSWER_MARKER}'")
    return question, chain, answer.strip()


def parse_aug_line(line: str, path: str = "<string>", lineno: int = 1) -> Example:
    """One GSM8K-Aug line: 'question||<<16-3-4=9>> <<9*2=18>> #### 18'."""
    question, chain, answer = _split_line(line, path, lineno)
    steps = _steps_from_notes(_chain_notes(chain, path, lineno))
    return Example(question, steps, answer, f"{path}:{lineno}")


def _mult_step(chunk: str, number: int, is_last: bool, answer: str, path: str, lineno: int) -> Step:
    """Step `number` (1-based) of a multiplication chain; see the module docstring for labels."""
    if number == 1:
        if not _PARTIAL.fullmatch(chunk):
            raise DataError(path, lineno, "step 1", f"expected the first partial product as digits, found {chunk!r}")
        return Step(chunk, chunk, critical=False)
    if is_last:
        if not _PARTIAL.fullmatch(chunk):
            raise DataError(path, lineno, f"step {number}", f"expected '+ <digits>' as the last step, found {chunk!r}")
        return Step(f"+ {chunk}", answer, critical=True)
    match = _PARTIAL_AND_SUM.fullmatch(chunk)
    if match is None:
        raise DataError(path, lineno, f"step {number}", f"expected '+ <digits> ( <running sum> )', found {chunk!r}")
    return Step(f"+ {chunk}", match.group(2), critical=True)


def _mult_chunks(chain: str) -> list[str]:
    """'A + B ( S ) + C' -> ['A', 'B ( S )', 'C'], single-spaced; [] for an empty chain."""
    tokens = " ".join(chain.split())
    return [chunk.strip() for chunk in f" {tokens} ".split(" + ")] if tokens else []


def parse_mult_line(line: str, path: str = "<string>", lineno: int = 1) -> Example:
    """One multiplication line (digits least significant first). Whitespace is normalised
    to single spaces, so Example.cot reproduces a well-formed chain exactly."""
    question, chain, answer = _split_line(line, path, lineno)
    if not _MULT_QUESTION.fullmatch(question):
        raise DataError(path, lineno, "operands", f"expected digits '*' digits, found {question.strip()[:40]!r}")
    answer = " ".join(answer.split())
    if not _PARTIAL.fullmatch(answer):
        raise DataError(path, lineno, "answer", f"expected space-separated digits, found {answer[:40]!r}")
    chunks = _mult_chunks(chain)
    steps = tuple(
        _mult_step(chunk, number, number == len(chunks), answer, path, lineno) for number, chunk in enumerate(chunks, 1)
    )
    return Example(" ".join(question.split()), steps, answer, f"{path}:{lineno}")


# ---------------------------------------------------------------- GSM8K JSON records


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return _JSON_TYPES.get(type(value), "number")


def _numeric_answer(value: int | float, path: str, lineno: int, field: str) -> str:
    """A bare JSON number as answer text; 72.0 is written '72' like GSM8K answers."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(path, lineno, field, f"not a finite number: {value}")
        if value.is_integer():
            return str(int(value))
    return str(value)


_NUMBER_IN_TEXT = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def _plain_steps(texts: list[str], critical: Any, path: str, lineno: int) -> tuple[Step, ...]:
    """Plain-text steps; each one's result is the last number it writes (what a probe of the
    latent state reads), and its label comes from `critical`, or is critical when none is given."""
    if critical is None:
        warnings.warn(f"{path}:{lineno}", UnlabelledSteps, stacklevel=2)  # gathered into one line by read_examples
        labels = [True] * len(texts)
    elif not (isinstance(critical, list) and all(isinstance(c, bool) for c in critical)):
        raise DataError(path, lineno, "critical", f"expected a list of true/false, got {_json_type(critical)}")
    elif len(critical) != len(texts):
        raise DataError(path, lineno, "critical", f"{len(critical)} labels for {len(texts)} steps")
    else:
        labels = critical
    results = [(_NUMBER_IN_TEXT.findall(text) or [""])[-1].replace(",", "") for text in texts]
    return tuple(Step(text, result, label) for text, result, label in zip(texts, results, labels))


def _cot_steps(cot: Any, critical: Any, path: str, lineno: int) -> tuple[Step, ...]:
    """The steps of a record's `cot`: equations labelled from their operands, or plain text."""
    if isinstance(cot, str):
        if cot.lstrip().startswith("<<"):
            texts = _chain_notes(cot, path, lineno)
        else:
            texts = [line.strip() for line in cot.splitlines() if line.strip()]
    elif isinstance(cot, list):
        for i, text in enumerate(cot):
            if not isinstance(text, str) or not text.strip() or _has_line_break(text):
                raise DataError(path, lineno, f"cot[{i}]", "expected a non-empty one-line string")
        texts = [text.strip() for text in cot]
    else:
        raise DataError(path, lineno, "cot", f"expected a string or a list of strings, got {_json_type(cot)}")
    if any(ANSWER_MARKER in text for text in texts):
        raise DataError(path, lineno, "cot", f"a step may not contain '{ANSWER_MARKER}' (it marks the answer)")
    if texts and all(note_operands(text) is not None for text in texts):
        if critical is not None:
            raise DataError(path, lineno, "critical", "equations are labelled from their operands; give labels only with plain-text steps")
        return _steps_from_notes(texts)
    return _plain_steps(texts, critical, path, lineno)


def _final_answer(value: Any, path: str, lineno: int, field: str) -> str:
    """The `answer` of a record with a `cot`: the final answer alone."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _numeric_answer(value, path, lineno, field)
    if not isinstance(value, str) or not value.strip() or _has_line_break(value.strip()):
        raise DataError(path, lineno, field, f"expected a number or a one-line string, got {_json_type(value)}")
    if ANSWER_MARKER in value:
        raise DataError(path, lineno, field, f"with a cot, give the final answer alone (no '{ANSWER_MARKER}')")
    return value.strip()


def parse_gsm8k_record(
    obj: Any, path: str = "<record>", lineno: int = 1, question_field: str = "question", answer_field: str = "answer"
) -> Example:
    """A JSON record: with a `cot`, this project's layout (the module docstring); without,
    GSM8K's, where the steps are the calculator notes in the answer and the gold answer
    follows '####'. An answer that is a bare number (72 or "72") gives an example without
    steps, which is how user evaluation files usually look."""
    if not isinstance(obj, dict):
        raise DataError(path, lineno, "record", f"expected a JSON object, got {_json_type(obj)}")
    for field in (question_field, answer_field):
        if field not in obj:
            raise DataError(path, lineno, field, "missing")
    question, answer = obj[question_field], obj[answer_field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, lineno, question_field, f"expected a non-empty string, got {_json_type(question)}")
    source = f"{path}:{lineno}"
    if "cot" in obj:
        steps = _cot_steps(obj["cot"], obj.get("critical"), path, lineno)
        return Example(question, steps, _final_answer(answer, path, lineno, answer_field), source)
    if "critical" in obj:
        raise DataError(path, lineno, "critical", "labels belong to a cot's plain-text steps, and this record has no cot")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return Example(question, (), _numeric_answer(answer, path, lineno, answer_field), source)
    if not isinstance(answer, str):
        raise DataError(path, lineno, answer_field, f"expected a string or a number, got {_json_type(answer)}")
    if ANSWER_MARKER not in answer:
        if parse_number(answer) is None:
            raise DataError(path, lineno, answer_field, f"expected '... {ANSWER_MARKER} <answer>' or a bare number")
        return Example(question, (), answer.strip(), source)
    reasoning, _, final = answer.rpartition(ANSWER_MARKER)
    if not final.strip():
        raise DataError(path, lineno, answer_field, f"nothing after '{ANSWER_MARKER}'")
    notes = [match.group(0) for match in _NOTE_IN_PROSE.finditer(reasoning)]
    return Example(question, _steps_from_notes(notes), final.strip(), source)


def _parse_json_line(text: str, path: str, lineno: int, question_field: str, answer_field: str) -> Example:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:
        is_array = text.lstrip().startswith("[")
        hint = " (this reader takes JSON lines, one object per line, not a JSON array)" if is_array else ""
        raise DataError(path, lineno, "json", f"invalid JSON: {err}{hint}") from None
    return parse_gsm8k_record(obj, path, lineno, question_field, answer_field)


# ---------------------------------------------------------------- files


def _raw_lines(path: str) -> list[bytes]:
    """The file's lines as bytes (split on '\\n' only), without a UTF-8 byte order mark."""
    return Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise DataError(path, lineno, "encoding", f"not valid UTF-8 (byte {err.start} of the line)") from None


def detect_format(path: str, raw_lines: list[bytes] | None = None) -> str:
    """'gsm8k' for .jsonl/.json; for .txt, 'mult' when the first line's question looks
    like 'digits * digits', else 'aug'. Pass `raw_lines` when the file is already read."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "gsm8k"
    if suffix != ".txt":
        problem = f"cannot tell the format from the suffix {suffix!r}; pass fmt= one of {FORMATS}"
        raise DataError(path, None, "format", problem)
    lines = (raw.decode("utf-8", "replace") for raw in (raw_lines if raw_lines is not None else _raw_lines(path)))
    first = next((line for line in lines if line.strip()), "")
    return "mult" if _MULT_QUESTION.fullmatch(first.partition("||")[0]) else "aug"


def _line_parser(fmt: str, question_field: str, answer_field: str) -> Callable[[str, str, int], Example]:
    if fmt == "gsm8k":
        return lambda text, path, lineno: _parse_json_line(text, path, lineno, question_field, answer_field)
    if fmt == "aug":
        return parse_aug_line
    if fmt == "mult":
        return parse_mult_line
    raise ValueError(f"fmt must be one of {FORMATS} or None, got {fmt!r}")


def read_examples(
    path: str | Path,
    *,
    fmt: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    skip_bad: bool = False,
    limit: int | None = None,
) -> list[Example]:
    """Every example of a file, in file order (at most `limit`); blank lines are ignored.

    A malformed line raises DataError naming the file, line and field. With skip_bad=True
    malformed lines are skipped instead, and a warning reports how many and the first error,
    so that data is never lost silently.
    """
    path = str(path)
    raw_lines = _raw_lines(path)
    parse = _line_parser(fmt or detect_format(path, raw_lines), question_field, answer_field)
    examples: list[Example] = []
    errors: list[DataError] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnlabelledSteps)
        for lineno, raw in enumerate(raw_lines, 1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                text = _decode(raw, path, lineno)
                if text.strip():
                    examples.append(parse(text, path, lineno))
            except DataError as err:
                if not skip_bad:
                    raise
                errors.append(err)
    unlabelled = [str(w.message) for w in caught if issubclass(w.category, UnlabelledSteps)]
    for w in caught:  # anything else raised while reading goes on as it came
        if not issubclass(w.category, UnlabelledSteps):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if errors:
        warnings.warn(f"{path}: skipped {len(errors)} bad line(s); the first: {errors[0]}", stacklevel=2)
    if unlabelled:
        warnings.warn(f"{path}: {len(unlabelled)} example(s) have plain-text steps without a 'critical' list "
                      f"(the first: line {unlabelled[0].split(':')[-1]}); every such step is labelled critical",
                      UnlabelledSteps, stacklevel=2)
    return examples


class UnlabelledSteps(UserWarning):
    """Plain-text steps came without criticality labels, so all of them count as critical."""


def _has_line_break(text: str) -> bool:
    return "\n" in text or "\r" in text


def format_aug_line(example: Example) -> str:
    """The GSM8K-Aug line for `example`. Raises DataError (naming example.source) rather
    than produce a line that would not read back as the same question, steps and answer."""
    where = example.source or "<example>"
    question, answer = example.question, example.answer
    if not question.strip() or "||" in question or question.endswith("|") or _has_line_break(question):
        raise DataError(where, None, "question", "empty, or contains '||', a line break or a trailing '|'")
    if not answer or answer != answer.strip() or ANSWER_MARKER in answer or _has_line_break(answer):
        raise DataError(where, None, "answer", f"empty, or has '{ANSWER_MARKER}', a line break or surrounding spaces")
    if _has_line_break(example.cot):
        raise DataError(where, None, "steps", "a step contains a line break")
    line = f"{question}||{example.cot} {ANSWER_MARKER} {answer}"
    try:
        notes = [step.text for step in parse_aug_line(line, where).steps]
    except DataError as err:
        raise DataError(where, None, err.field, err.problem) from None
    if notes != [step.text for step in example.steps]:
        raise DataError(where, None, "steps", "would not read back as written; each must be one '<<expr=result>>'")
    return line


def write_aug_lines(examples: Iterable[Example], path: str | Path) -> None:
    """Write examples in the GSM8K-Aug layout. Every line is checked before the file is
    opened, so a bad example leaves no half-written file behind."""
    text = "".join(format_aug_line(example) + "\n" for example in examples)
    Path(path).write_bytes(text.encode("utf-8"))
