"""Your own data: train, validation and test files, and the rules that keep evaluation honest.

- A split given as a file is read whole (`read_examples`: a bad line stops everything and is
  named by file, line and field).
- A split not given is held out of the training file, by question, with a seeded shuffle:
  the training file is never its own test set.
- A question in the training data that also appears in the validation or test data is
  refused (`check_disjoint`), unless the caller allows it.
"""

from __future__ import annotations

import random
from pathlib import Path

from .formats import read_examples
from .records import DataError, Example

SPLITS = ("train", "valid", "test")


def question_key(question: str) -> str:
    """Question text for matching across files: case and whitespace do not make a new question."""
    return " ".join(question.split()).casefold()


def hold_out(examples: list[Example], names: list[str], share: float, seed: int) -> dict[str, list[Example]]:
    """Split `examples` into "train" and each of `names`, `share` of the distinct questions
    each (at least one), by a shuffle seeded with `seed`. Repeats of a question stay together,
    so a held-out question is never also trained on."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(question_key(example.question), []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    size = max(1, round(share * len(keys)))
    if len(keys) < size * len(names) + 1:
        raise DataError(examples[0].source.rpartition(":")[0] if examples else "<data>", None, "questions",
                        f"{len(keys)} distinct questions are too few to hold out {len(names)} split(s) of {size}")
    out, start = {}, 0
    for name in names:
        out[name] = [e for key in keys[start:start + size] for e in groups[key]]
        start += size
    out["train"] = [e for key in keys[start:] for e in groups[key]]
    return out


def file_splits(train: str | Path, valid: str | Path | None = None, test: str | Path | None = None, *,
                holdout: float = 0.1, seed: int = 0) -> dict[str, list[Example]]:
    """The three splits from the files given; the missing ones held out of `train`."""
    given = {"train": train, "valid": valid, "test": test}
    splits = {name: read_examples(path) for name, path in given.items() if path is not None}
    missing = [name for name in ("valid", "test") if given[name] is None]
    if missing:
        splits.update(hold_out(splits["train"], missing, holdout, seed))
    return splits


def check_disjoint(splits: dict[str, list[Example]], files: dict[str, str] | None = None) -> None:
    """Refuse training questions that reappear in validation or test data, naming the files
    (or splits) and how many questions they share."""
    seen = {question_key(e.question) for e in splits["train"]}
    for name in ("valid", "test"):
        shared = seen & {question_key(e.question) for e in splits.get(name, [])}
        if shared:
            where = {k: (files or {}).get(k) or f"the {k} split" for k in ("train", name)}
            example = sorted(shared)[0][:60]
            raise DataError(where["train"], None, "question",
                            f"{len(shared)} question(s) also appear in {where[name]} (e.g. {example!r}); evaluation "
                            "must not see training questions (task.allow_overlap: true accepts them)")
