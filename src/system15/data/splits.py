"""The GSM8K splits used by implicit-CoT, Coconut and CODI, rebuilt from the shared files:
the GSM8K-Aug validation questions are held out of the original GSM8K train set."""

from __future__ import annotations

from pathlib import Path

from .formats import read_examples
from .records import DataError, Example


def _normalise(question: str) -> str:
    """Question text for matching: the two files differ only in whitespace, if at all."""
    return " ".join(question.split())


def gsm8k_valid_split(aug_valid_txt: str | Path) -> list[Example]:
    """The 500 GSM8K-Aug validation examples."""
    return read_examples(aug_valid_txt, fmt="aug")


def gsm8k_train_split(gsm8k_train_jsonl: str | Path, aug_valid_txt: str | Path) -> list[Example]:
    """GSM8K train with the validation questions removed (6973 of 7473 on the shared data),
    steps taken from the calculator notes as in the equation-only GSM8K-Aug layout.

    Raises DataError when a validation question is not in the train file: the held-out set
    would otherwise leak into training unnoticed.
    """
    train = read_examples(gsm8k_train_jsonl, fmt="gsm8k")
    held_out = {_normalise(example.question): example for example in gsm8k_valid_split(aug_valid_txt)}
    train_questions = {_normalise(example.question) for example in train}
    for question, example in held_out.items():
        if question not in train_questions:
            line = int(example.source.rpartition(":")[2])
            raise DataError(
                str(aug_valid_txt), line, "question", f"validation question not found in {gsm8k_train_jsonl}"
            )
    return [example for example in train if _normalise(example.question) not in held_out]
