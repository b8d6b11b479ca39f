"""Multiplication chains (data/multiplication.py): the generator writes the shared files' lines
exactly, and keeps generated questions distinct and apart from the held-out ones."""

import pytest

from system15.data import generate_mult, mult_example, read_examples
from tests.helpers import DATA_ROOT as DATA
from tests.helpers import needs_shared_data


@needs_shared_data
@pytest.mark.parametrize("name", ["4x4/valid.txt", "4x4/test.txt", "5x5/valid.txt", "5x5/test.txt"])
def test_mult_generator_reproduces_shared_lines(name):
    digits = int(name[0])
    for example in read_examples(DATA / "mult" / name):
        a, b = (int("".join(operand.split())[::-1]) for operand in example.question.split("*"))
        generated = mult_example(a, b, digits, example.source)
        assert generated == example


def test_generate_mult_excludes_and_dedupes():
    first = generate_mult(50, 2, seed=0)
    assert len({e.question for e in first}) == 50
    rest = generate_mult(20, 2, seed=0, exclude={e.question for e in first})
    assert not {e.question for e in first} & {e.question for e in rest}
    with pytest.raises(ValueError, match="distinct"):
        generate_mult(82, 1, seed=0)  # only 9 x 9 one-digit products exist
