"""Your own data files (data/files.py): questions matched across files, splits held out of the
training file by question, and training questions refused in validation or test data."""

import pytest

import system15
from system15.data import (DataError, Example, SyntheticTask, check_disjoint, file_splits, hold_out, question_key,
                           write_aug_lines)
from tests.helpers import write_jsonl


def ex(question: str, source: str = "mine.jsonl:1") -> Example:
    return Example(question, (), "1", source)


def test_case_and_spacing_do_not_make_a_new_question():
    assert question_key("  What is\t2 +  2? ") == question_key("what is 2 + 2?") == "what is 2 + 2?"
    assert question_key("what is 2 + 3?") != question_key("what is 2 + 2?")


def test_hold_out_takes_a_share_of_the_questions_and_keeps_repeats_together():
    examples = [ex(f"q{i}") for i in range(20)] + [ex("Q3 "), ex("q3")]  # q3 asked three times
    splits = hold_out(examples, ["valid", "test"], share=0.1, seed=0)
    keys = {name: [question_key(e.question) for e in split] for name, split in splits.items()}
    assert len(set(keys["valid"])) == len(set(keys["test"])) == 2  # 10% of 20 distinct questions each
    assert sorted(e.question for split in splits.values() for e in split) == sorted(e.question for e in examples)
    assert not set(keys["train"]) & set(keys["valid"]) and not set(keys["train"]) & set(keys["test"])
    assert not set(keys["valid"]) & set(keys["test"])
    holding_q3 = [name for name, k in keys.items() if "q3" in k]
    assert len(holding_q3) == 1 and keys[holding_q3[0]].count("q3") == 3
    assert hold_out(examples, ["valid", "test"], share=0.1, seed=0) == splits  # seeded
    others = [hold_out(examples, ["valid"], share=0.1, seed=s)["valid"] for s in range(1, 6)]
    assert any(o != splits["valid"] for o in others)


def test_too_few_questions_to_hold_out_are_refused_naming_the_file():
    with pytest.raises(DataError, match=r"mine.jsonl: questions: 2 distinct questions are too few to hold out "
                                        r"2 split\(s\) of 1"):
        hold_out([ex("a"), ex("b")], ["valid", "test"], share=0.1, seed=0)


def test_a_training_question_in_the_test_data_is_refused_naming_both_files():
    splits = {"train": [ex("Same question"), ex("other")], "valid": [ex("new")], "test": [ex("same   QUESTION")]}
    with pytest.raises(DataError, match=r"train.jsonl: question: 1 question\(s\) also appear in test.jsonl "
                                        r"\(e.g. 'same question'\)"):
        check_disjoint(splits, {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"})
    with pytest.raises(DataError, match=r"the train split: question: 1 question\(s\) also appear in the test split"):
        check_disjoint(splits)
    check_disjoint({"train": splits["train"], "valid": splits["valid"]})  # no test split: nothing shared


def test_the_splits_not_given_are_held_out_of_the_training_file(tmp_path):
    lines = [f"a={i},b=1. a+b?||<<{i}+1={i + 1}>>#### {i + 1}" for i in range(30)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    write_aug_lines([ex("given?")], tmp_path / "test.txt")
    both = file_splits(tmp_path / "train.txt", test=tmp_path / "test.txt", holdout=0.2, seed=0)
    assert [e.question for e in both["test"]] == ["given?"]  # read whole
    assert len(both["valid"]) == 6 and len(both["train"]) == 24
    alone = file_splits(tmp_path / "train.txt", holdout=0.2, seed=0)
    assert len(alone["valid"]) == len(alone["test"]) == 6 and len(alone["train"]) == 18


# -- through the config: task.name=files ---------------------------------------------------

def test_train_and_test_files_that_share_questions_are_refused(tmp_path, examples):
    from system15.data import load_splits

    train = write_jsonl(tmp_path / "train.jsonl", examples[:8])
    test = write_jsonl(tmp_path / "test.jsonl", examples[6:10])
    valid = write_jsonl(tmp_path / "valid.jsonl", examples[10:12])
    files = ["task.name=files", f"task.train={train}", f"task.valid={valid}", f"task.test={test}"]
    config = system15.load_config(None, files)
    with pytest.raises(DataError, match=r"train.jsonl: question: 2 question\(s\) also appear in .*test.jsonl"):
        load_splits(config)
    allowed = system15.load_config(None, [*files, "task.allow_overlap=true"])
    assert len(load_splits(allowed)["test"]) == 4


def test_a_single_file_is_split_by_a_seeded_hold_out_without_overlap(tmp_path):
    examples = SyntheticTask(n_steps=2).generate(200, seed=5)
    path = write_jsonl(tmp_path / "all.jsonl", examples + examples[:20])  # repeats stay on one side
    from system15.data import load_splits

    splits = load_splits(system15.load_config(None, ["task.name=files", f"task.train={path}", "task.n_valid=500"]))
    keys = {name: {question_key(e.question) for e in split} for name, split in splits.items()}
    assert keys["train"] and keys["valid"] and keys["test"]
    assert not (keys["train"] & keys["valid"] or keys["train"] & keys["test"] or keys["valid"] & keys["test"])
    distinct = len({question_key(e.question) for e in examples})
    assert sum(len(s) for s in splits.values()) == 220 and len(keys["test"]) == round(0.1 * distinct)
    again = load_splits(system15.load_config(None, ["task.name=files", f"task.train={path}", "task.n_valid=500"]))
    assert again == splits
    other = load_splits(system15.load_config(None, ["task.name=files", f"task.train={path}", "task.seed=1"]))
    assert {question_key(e.question) for e in other["test"]} != keys["test"]
