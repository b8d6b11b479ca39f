"""Every line of the shared data reads, gets labels, and the splits come out as published."""

from pathlib import Path

import pytest

from system15.data import (
    DataError,
    generate_mult,
    gsm8k_train_split,
    load_task,
    mult_example,
    read_examples,
    write_aug_lines,
)

PROJECT = Path(__file__).resolve().parents[2]
DATA = PROJECT.parent / "shared" / "data"  # the default data_root, ../shared/data, seen from the project root
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

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


@pytest.mark.parametrize("name, count", EXPECTED_LINES.items())
def test_every_line_parses_with_labels(name, count):
    path = DATA / name
    examples = read_examples(path)
    assert len(examples) == count == _file_lines(path)  # no line dropped
    assert all(example.answer for example in examples)
    steps = [step for example in examples for step in example.steps]
    assert any(step.critical for step in steps) and any(not step.critical for step in steps)
    assert all(not example.steps[0].critical for example in examples if example.steps)


@pytest.mark.parametrize("name", ["gsm8k_aug/valid.txt", "gsm8k_aug/test.txt"])
def test_aug_lines_round_trip_exactly(tmp_path, name):
    path = DATA / name
    write_aug_lines(read_examples(path), tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_bytes() == path.read_bytes()


def test_gsm8k_notes_agree_with_aug_chains():
    """The aug files are GSM8K with only the notes kept; our reading of both must agree."""
    original = {" ".join(e.question.split()): e for e in read_examples(DATA / "gsm8k/test.jsonl")}
    for aug in read_examples(DATA / "gsm8k_aug/test.txt"):
        gsm8k = original[" ".join(aug.question.split())]
        assert (gsm8k.steps, gsm8k.answer) == (aug.steps, aug.answer)


def test_train_split_holds_out_validation():
    train = gsm8k_train_split(str(DATA / "gsm8k/train.jsonl"), str(DATA / "gsm8k_aug/valid.txt"))
    assert len(train) == 6973
    valid = {" ".join(e.question.split()) for e in read_examples(DATA / "gsm8k_aug/valid.txt")}
    assert not valid & {" ".join(e.question.split()) for e in train}


@pytest.mark.parametrize("name", ["4x4/valid.txt", "4x4/test.txt", "5x5/valid.txt", "5x5/test.txt"])
def test_mult_generator_reproduces_shared_lines(name):
    digits = int(name[0])
    for example in read_examples(DATA / "mult" / name):
        a, b = (int("".join(operand.split())[::-1]) for operand in example.question.split("*"))
        generated = mult_example(a, b, digits, example.source)
        assert generated == example


def test_load_task_shared_splits():
    root = str(DATA)
    assert [len(load_task("gsm8k", split, data_root=root)) for split in ("train", "valid", "test")] == [6973, 500, 1319]
    assert len(load_task("gsm8k", "test", data_root=root, n=7)) == 7
    assert len(load_task("mult5", "valid", data_root=root)) == 1000
    train = load_task("mult4", "train", data_root=root, n=300, seed=1)
    held_out = {e.question for split in ("valid", "test") for e in load_task("mult4", split, data_root=root)}
    assert len(train) == 300 and not held_out & {e.question for e in train}
    assert train == load_task("mult4", "train", data_root=root, n=300, seed=1)
    assert train != load_task("mult4", "train", data_root=root, n=300, seed=2)


def test_default_data_root_is_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(PROJECT)
    assert len(load_task("gsm8k", "valid")) == 500


def test_missing_validation_question_is_reported(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "Only this one?", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"valid\.txt:1: question: validation question not found"):
        gsm8k_train_split(train, DATA / "gsm8k_aug/valid.txt")


def test_generate_mult_excludes_and_dedupes():
    first = generate_mult(50, 2, seed=0)
    assert len({e.question for e in first}) == 50
    rest = generate_mult(20, 2, seed=0, exclude={e.question for e in first})
    assert not {e.question for e in first} & {e.question for e in rest}
    with pytest.raises(ValueError, match="distinct"):
        generate_mult(82, 1, seed=0)  # only 9 x 9 one-digit products exist
