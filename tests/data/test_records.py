"""Answer matching, answer extraction, equation labels and the DataError message."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from system15.data import DataError, Example, Step, answers_match, extract_answer, label_equations, parse_number


def test_data_error_message_and_attributes():
    err = DataError("data/x.txt", 7, "answer", "nothing after '####'")
    assert str(err) == "data/x.txt:7: answer: nothing after '####'"
    assert (err.path, err.line, err.field, err.problem) == ("data/x.txt", 7, "answer", "nothing after '####'")
    assert isinstance(err, ValueError)
    assert str(DataError("x.bin", None, "format", "unknown")) == "x.bin: format: unknown"


def test_cot_joins_step_texts():
    steps = (Step("<<16-3-4=9>>", "9", False), Step("<<9*2=18>>", "18", True))
    assert Example("q", steps, "18").cot == "<<16-3-4=9>> <<9*2=18>>"
    assert Example("q", (), "5").cot == ""


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("18", "18"),
        ("18.0", "18"),
        ("1,000", "1000"),
        ("$5", "5"),
        ("5.", "5"),
        (" 7 ", "7"),
        ("-3", "-3"),
        ("0.75", "3/4"),
        ("5 5 6 0", "5  5 6 0"),
        ("yes", "yes"),
    ],
)
def test_answers_match(predicted, gold):
    assert answers_match(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [
        (None, "18"),
        ("17", "18"),
        ("", "18"),
        ("18 apples", "18"),
        ("5 5 6 1", "5 5 6 0"),
        ("1e3", "1000"),
        ("-18", "18"),
    ],
)
def test_answers_do_not_match(predicted, gold):
    assert not answers_match(predicted, gold)


def test_parse_number_rejects_exponents_and_junk():
    assert parse_number("1e999999999") is None  # would otherwise build a huge integer
    assert parse_number("5/0") is None
    assert parse_number("$1,234.50") == parse_number("1234.5")
    assert parse_number("") is None and parse_number("abc") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<<9*2=18>> #### 18", "18"),
        ("#### 1 #### 2 ", "2"),
        ("no marker", None),
        ("ends with ####", None),
        ("#### \n", None),
        ("#### 5 5 6 0", "5 5 6 0"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "equations, expected",
    [
        ([("16-3-4", "9"), ("9*2", "18")], [False, True]),
        ([("48/2", "24"), ("48+24", "72")], [False, True]),
        ([("2*3", "6"), ("4*5", "20"), ("6+20", "26")], [False, False, True]),
        ([("100/2", "50"), ("15*2", "30"), ("100-50-30-15", "5")], [False, False, True]),
        ([("4-2", "2"), ("2/.5", "4"), ("12/4", "3")], [False, True, True]),  # ".5" is an operand, "2" matches
        ([("3", "3"), ("1.5*2", "3.0"), ("3.00+1", "4")], [False, False, True]),  # numeric, not textual
        ([("1,000*2", "2,000"), ("2000/4", "500")], [False, True]),
        ([("3-5", "-2"), ("2*4", "8")], [False, True]),  # results compared by absolute value
        ([("3/4", "3/4"), ("0.75*4", "3")], [False, True]),  # a fraction result
        ([("2*3 hours", "6"), ("6 dollars + 1", "7")], [False, True]),  # units are ignored
        ([("5+5", ""), ("10*2", "20")], [False, False]),  # no result to match
        ([("9*2", "18"), ("18*1", "18")], [False, True]),
        ([], []),
    ],
)
def test_label_equations(equations, expected):
    assert label_equations(equations) == expected


@settings(max_examples=200, deadline=None)
@given(predicted=st.text() | st.none(), gold=st.text(), equations=st.lists(st.tuples(st.text(), st.text()), max_size=4))
def test_helpers_accept_any_text(predicted, gold, equations):
    assert isinstance(answers_match(predicted, gold), bool)
    assert extract_answer(gold) is None or extract_answer(gold) == extract_answer(gold).strip() != ""
    assert len(label_equations(equations)) == len(equations)
