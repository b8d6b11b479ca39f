"""The file formats (data/formats.py): parsing, malformed input, round trips and robustness
of the readers, and every line of the shared data files."""

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from system15.data import (
    DataError,
    Example,
    Step,
    format_aug_line,
    parse_aug_line,
    parse_gsm8k_record,
    parse_mult_line,
    read_examples,
    write_aug_lines,
)
from system15.data.records import ANSWER_MARKER
from tests.helpers import DATA_ROOT as DATA
from tests.helpers import needs_shared_data

MULT_LINE = (
    "5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 )"
    " + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1"
)


def test_parse_aug_line():
    example = parse_aug_line("Janet has 16 eggs.||<<16-3-4=9>> <<9*2=18>> #### 18\n", "f.txt", 4)
    assert example.question == "Janet has 16 eggs."
    assert example.steps == (Step("<<16-3-4=9>>", "9", False), Step("<<9*2=18>>", "18", True))
    assert (example.answer, example.source, example.cot) == ("18", "f.txt:4", "<<16-3-4=9>> <<9*2=18>>")


def test_parse_aug_line_empty_chain_and_odd_notes():
    assert parse_aug_line("q|| #### 5").steps == ()
    odd = parse_aug_line("q||<<3*4>> <<2 dollars*6=12 dollars>> <<3/4=3/4>> #### 12")
    assert [(s.text, s.result) for s in odd.steps] == [
        ("<<3*4>>", ""),
        ("<<2 dollars*6=12 dollars>>", "12 dollars"),
        ("<<3/4=3/4>>", "3/4"),
    ]


def test_parse_mult_line_steps_and_labels():
    example = parse_mult_line(MULT_LINE, "m.txt", 2)
    assert example.question == "5 6 3 2 * 7 4 3 4"
    assert example.cot == MULT_LINE.split("||")[1].split(" ####")[0]
    assert [s.text for s in example.steps] == [
        "5 5 5 6 1",
        "+ 0 0 6 4 9 0 ( 5 5 1 1 1 1 )",
        "+ 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 )",
        "+ 0 0 0 0 6 4 9 0",
    ]
    assert [s.result for s in example.steps] == ["5 5 5 6 1", "5 5 1 1 1 1", "5 5 6 0 2 8 0", "5 5 6 0 8 2 0 1"]
    assert [s.critical for s in example.steps] == [False, True, True, True]
    assert example.answer == "5 5 6 0 8 2 0 1"


def test_parse_gsm8k_record_steps_and_answer():
    record = {"question": "Natalia sold 48 clips.", "answer": "48/2 = <<48/2=24>>24.\n48+24 = <<48+24=72>>72.\n#### 72"}
    example = parse_gsm8k_record(record, "t.jsonl", 3)
    assert example.cot == "<<48/2=24>> <<48+24=72>>"
    assert [s.critical for s in example.steps] == [False, True]
    assert (example.answer, example.source) == ("72", "t.jsonl:3")


@pytest.mark.parametrize(
    "answer, expected", [(72, "72"), ("72", "72"), (" 1,000 ", "1,000"), (72.0, "72"), (2.5, "2.5")]
)
def test_parse_gsm8k_record_bare_number_answer(answer, expected):
    example = parse_gsm8k_record({"q": "How many?", "a": answer}, "eval.jsonl", 1, "q", "a")
    assert (example.steps, example.answer) == ((), expected)


# (format, bad line, field the error must name)
BROKEN_LINES = [
    ("aug", "What is 2+2? <<2+2=4>> #### 4", "separator ||"),
    ("aug", "What is 2+2?||<<2+2=4>> 4", "answer"),
    ("aug", "What is 2+2?||<<2+2=4>> #### 4 #### 5", "answer"),
    ("aug", "What is 2+2?||<<2+2=4>> ####   ", "answer"),
    ("aug", "What is 2+2?||<<1+1=2>> 2+2=4 #### 4", "equation 2"),
    ("aug", "What is 2+2?||<<1+1=2 #### 4", "equation 1"),
    ("aug", "   ||<<2+2=4>> #### 4", "question"),
    ("mult", "5 6 x 2 * 7 4 3 4||5 5 5 6 1 #### 5 5", "operands"),
    ("mult", "5 6 * 7 4||0 0 9 + 2 2 ( 3 ) #### 1 2 3 x", "answer"),
    ("mult", "5 6 * 7 4||0 0 9 + 0 2 2 + 1 1 1 1 #### 1 2 3 4", "step 2"),
    ("mult", "5 6 * 7 4||0 0 9 + 0 2 2 ( 0 2 2 ) #### 1 2 3 4", "step 2"),
    ("mult", "5 6 * 7 4||+ 0 0 9 #### 1 2 3 4", "step 1"),
    ("mult", "5 6 * 7 4||0 0 9 + #### 1 2 3 4", "step 2"),
    ("gsm8k", '{"question": "q", "answer": "#### 4"', "json"),
    ("gsm8k", '{"question": "q", "answer": "#### 4"} trailing', "json"),
    ("gsm8k", "[1, 2]", "record"),
    ("gsm8k", '["q", "#### 4"]', "record"),
    ("gsm8k", '{"answer": "#### 4"}', "question"),
    ("gsm8k", '{"question": "", "answer": "#### 4"}', "question"),
    ("gsm8k", '{"question": "q"}', "answer"),
    ("gsm8k", '{"question": "q", "answer": ["4"]}', "answer"),
    ("gsm8k", '{"question": "q", "answer": true}', "answer"),
    ("gsm8k", '{"question": "q", "answer": NaN}', "answer"),
    ("gsm8k", '{"question": "q", "answer": "four"}', "answer"),
    ("gsm8k", '{"question": "q", "answer": "<<2+2=4>> ####"}', "answer"),
]
GOOD_LINES = {
    "aug": "What is 1+1?||<<1+1=2>> #### 2",
    "mult": MULT_LINE,
    "gsm8k": json.dumps({"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}),
}
SUFFIX = {"aug": ".txt", "mult": ".txt", "gsm8k": ".jsonl"}


@pytest.mark.parametrize("fmt, bad, field", BROKEN_LINES)
def test_broken_line_is_located(tmp_path, fmt, bad, field):
    path = tmp_path / f"data{SUFFIX[fmt]}"
    path.write_text(f"{GOOD_LINES[fmt]}\n\n{bad}\n{GOOD_LINES[fmt]}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_examples(path)  # the format is detected from the good first line
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 3, field)
    assert str(caught.value).startswith(f"{path}:3: {field}: ")


def test_undecodable_bytes_are_located(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(GOOD_LINES["aug"].encode() + b"\nq\xff\xfe||<<1+1=2>> #### 2\n")
    with pytest.raises(DataError, match=r"data\.txt:2: encoding: "):
        read_examples(path)


def test_json_array_gets_a_hint(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('[\n{"question": "q", "answer": 1}\n]\n')
    with pytest.raises(DataError, match="JSON lines"):
        read_examples(path)


def test_skip_bad_reports_count_and_first_error(tmp_path):
    path = tmp_path / "data.txt"
    good = GOOD_LINES["aug"]
    path.write_text("\n".join([good, "no separator #### 1", good, "q||<<1=1>>", "q|| #### "]) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 3 bad line\(s\); the first: .*data\.txt:2: separator \|\|"):
        examples = read_examples(path, skip_bad=True)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]


def test_good_file_reads_without_warning(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\r\n".join([GOOD_LINES["aug"]] * 3) + "\r\n  \t\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_examples(path, skip_bad=True)) == 3
    assert len(read_examples(path, limit=2)) == 2


def test_detection_and_explicit_format(tmp_path):
    mult = tmp_path / "m.txt"
    mult.write_text(MULT_LINE + "\n")
    assert read_examples(mult)[0].steps[0].text == "5 5 5 6 1"
    with pytest.raises(DataError, match="equation 1"):
        read_examples(mult, fmt="aug")
    other = tmp_path / "data.csv"
    other.write_text("x\n")
    with pytest.raises(DataError, match="format"):
        read_examples(other)
    with pytest.raises(ValueError, match="fmt must be one of"):
        read_examples(mult, fmt="csv")


def test_custom_field_names(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"problem": "How many?", "solution": 72}) + "\n")
    [example] = read_examples(path, question_field="problem", answer_field="solution")
    assert (example.question, example.steps, example.answer) == ("How many?", (), "72")


def test_write_then_read_round_trip(tmp_path):
    examples = [
        parse_aug_line("Janet's ducks lay 16 eggs.||<<16-3-4=9>> <<9*2=18>> #### 18"),
        parse_aug_line("A robe  takes 2 bolts.|| #### 3"),
    ]
    path = tmp_path / "out.txt"
    write_aug_lines(examples, path)
    back = read_examples(path)
    assert [(e.question, e.steps, e.answer) for e in back] == [(e.question, e.steps, e.answer) for e in examples]
    assert (
        path.read_text()
        == "Janet's ducks lay 16 eggs.||<<16-3-4=9>> <<9*2=18>> #### 18\nA robe  takes 2 bolts.|| #### 3\n"
    )


@pytest.mark.parametrize(
    "example, field",
    [
        (Example("a||b", (), "1"), "question"),
        (Example("line\nbreak", (), "1"), "question"),
        (Example("ends with |", (), "1"), "question"),
        (Example("q", (), "1 #### 2"), "answer"),
        (Example("q", (), ""), "answer"),
        (Example("q", (Step("9+3=12", "12", False),), "12"), "equation 1"),
        (Example("q", (Step("<<1=1>> <<2=2>>", "2", False),), "2"), "steps"),
        (Example("q", (Step("<<1=1\n>>", "1", False),), "1"), "steps"),
    ],
)
def test_unwritable_examples_are_refused(tmp_path, example, field):
    path = tmp_path / "out.txt"
    with pytest.raises(DataError) as caught:
        write_aug_lines([Example("fine", (), "1"), example], path)
    assert caught.value.field == field
    assert not path.exists()


# ---------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder for all examples of a property (hypothesis rejects function-scoped fixtures)."""
    return tmp_path_factory.mktemp("properties")


_PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_or_data_error(path: Path, fmt: str | None) -> None:
    try:
        examples = read_examples(path, fmt=fmt, skip_bad=False)
    except DataError:
        return
    assert all(isinstance(example, Example) for example in examples)


# Pieces of the real layouts, so that generated lines get past the first checks.
_LAYOUT_PIECES = ["||", "####", "<<", ">>", "<<1+2=3>>", "=", " ", " + ", "*", "( 3 )", "0 0 9", "5 6 * 7 4"]
_OTHER_PIECES = ["1e999", "-", "/", ".5", "72", "[", "{", '"', "\\u0000"]
_PIECE = st.lists(st.sampled_from(_LAYOUT_PIECES + _OTHER_PIECES) | st.text(max_size=3), max_size=8).map("".join)
_TXT_LINE = st.tuples(
    _PIECE, st.sampled_from(["||", "|", ""]), _PIECE, st.sampled_from([" #### ", "####", ""]), _PIECE
).map("".join)
_JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TXT_LINE,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["question", "answer"]), inner, max_size=2)
    ),
    max_leaves=5,
)
_LINE = st.one_of(_PIECE, _TXT_LINE, _JSON_VALUE.map(json.dumps))
_FORMATS = st.sampled_from([None, "aug", "mult", "gsm8k"])


@_PROPERTY
@given(lines=st.lists(_LINE | st.text(), max_size=4), suffix=st.sampled_from([".txt", ".jsonl", ".json"]), fmt=_FORMATS)
def test_arbitrary_text_gives_examples_or_data_error(scratch, lines, suffix, fmt):
    path = scratch / f"text{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8")
    _read_or_data_error(path, fmt)


@_PROPERTY
@given(data=st.binary(max_size=300), fmt=_FORMATS)
def test_arbitrary_bytes_give_examples_or_data_error(scratch, data, fmt):
    path = scratch / "bytes.txt"
    path.write_bytes(data)
    _read_or_data_error(path, fmt)


_NOTE_TEXT = st.text(alphabet=st.characters(blacklist_characters="<>\n\r", blacklist_categories=("Cs",)), max_size=12)
_NOTE = st.builds(lambda expr, result: f"<<{expr}={result}>>", _NOTE_TEXT, _NOTE_TEXT)
_WELL_FORMED_NOTE = _NOTE.filter(lambda note: ANSWER_MARKER not in note)  # the marker belongs to the answer only


@_PROPERTY
@given(
    question=st.text(min_size=1, max_size=40),
    notes=st.lists(_NOTE, max_size=4),
    answer=st.text(min_size=1, max_size=10),
)
def test_format_round_trips_or_refuses(question, notes, answer):
    example = Example(question, tuple(Step(note, "", False) for note in notes), answer)
    try:
        line = format_aug_line(example)
    except DataError:
        return
    back = parse_aug_line(line)
    assert (back.question, back.cot, back.answer) == (question, example.cot, answer)


@_PROPERTY
@given(
    question=st.text(
        alphabet=st.characters(blacklist_characters="|\n\r", blacklist_categories=("Cs",)), min_size=1, max_size=40
    ).filter(str.strip),
    notes=st.lists(_WELL_FORMED_NOTE, max_size=4),
    answer=st.from_regex(r"-?[0-9]{1,6}", fullmatch=True),
)
def test_well_formed_examples_always_round_trip(question, notes, answer):
    example = Example(question, tuple(Step(note, "", False) for note in notes), answer)
    back = parse_aug_line(format_aug_line(example))
    assert (back.question, [s.text for s in back.steps], back.answer) == (question, notes, answer)


def test_a_step_holding_the_answer_marker_is_refused_not_written():
    example = Example("q", (Step("<<=####>>", "", False),), "0", "ex:1")
    with pytest.raises(DataError, match="ex:1.*'####'"):
        format_aug_line(example)


# -- the shared data files ------------------------------------------------------------------

EXPECTED_LINES = {
    "gsm8k/train.jsonl": 7473,
    "gsm8k/test.jsonl": 1319,
    "gsm8k_aug/valid.txt": 500,
    "gsm8k_aug/test.txt": 1319,
    "mult/4x4/valid.txt": 1000,
    "mult/4x4/test.txt": 1000,
    "mult/5x5/valid.txt": 1000,
    "mult/5x5/test.txt": 1000,
}


def _file_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())


@needs_shared_data
@pytest.mark.parametrize("name, count", EXPECTED_LINES.items())
def test_every_line_parses_with_labels(name, count):
    path = DATA / name
    examples = read_examples(path)
    assert len(examples) == count == _file_lines(path)  # no line dropped
    assert all(example.answer for example in examples)
    steps = [step for example in examples for step in example.steps]
    assert any(step.critical for step in steps) and any(not step.critical for step in steps)
    assert all(not example.steps[0].critical for example in examples if example.steps)


@needs_shared_data
@pytest.mark.parametrize("name", ["gsm8k_aug/valid.txt", "gsm8k_aug/test.txt"])
def test_aug_lines_round_trip_exactly(tmp_path, name):
    path = DATA / name
    write_aug_lines(read_examples(path), tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_bytes() == path.read_bytes()


@needs_shared_data
def test_gsm8k_notes_agree_with_aug_chains():
    """The aug files are GSM8K with only the notes kept; our reading of both must agree."""
    original = {" ".join(e.question.split()): e for e in read_examples(DATA / "gsm8k/test.jsonl")}
    for aug in read_examples(DATA / "gsm8k_aug/test.txt"):
        gsm8k = original[" ".join(aug.question.split())]
        assert (gsm8k.steps, gsm8k.answer) == (aug.steps, aug.answer)
