"""Data layer: reading, writing, labelling and generating reasoning chains.

Only the standard library is used here, so data can be checked without torch installed.
`load_task` is the one entry point the rest of the package needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .formats import (
    FORMATS,
    detect_format,
    format_aug_line,
    parse_aug_line,
    parse_gsm8k_record,
    parse_mult_line,
    read_examples,
    write_aug_lines,
)
from .files import check_disjoint, file_splits, hold_out, question_key
from .multiplication import generate_mult, mult_example
from .records import DataError, Example, Step, answers_match, extract_answer, label_equations, parse_number
from .splits import gsm8k_train_split, gsm8k_valid_split
from .synthetic import SyntheticTask, split_of, synthetic_splits

if TYPE_CHECKING:  # the config module needs no data, and the data layer no torch
    from ..config import RunConfig

TASKS = ("synthetic", "gsm8k", "mult4", "mult5")
SPLITS = ("train", "valid", "test")

__all__ = [
    "FORMATS",
    "SPLITS",
    "TASKS",
    "DataError",
    "Example",
    "Step",
    "SyntheticTask",
    "answers_match",
    "check_disjoint",
    "file_splits",
    "hold_out",
    "question_key",
    "detect_format",
    "extract_answer",
    "format_aug_line",
    "generate_mult",
    "gsm8k_train_split",
    "gsm8k_valid_split",
    "label_equations",
    "load_splits",
    "load_task",
    "mult_example",
    "parse_aug_line",
    "parse_gsm8k_record",
    "parse_mult_line",
    "parse_number",
    "read_examples",
    "split_of",
    "synthetic_splits",
    "write_aug_lines",
]


def _data_dir(data_root: str, *parts: str) -> Path:
    """A folder of the shared data; a missing one is named in full, since a relative
    data_root depends on the working directory."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {str(root.resolve())!r} does not exist (data_root={data_root!r}, "
            f"resolved against the working directory {str(Path.cwd())!r})"
        )
    return root.joinpath(*parts)


def _mult_split(digits: int, split: str, data_root: str, n: int | None, n_train: int, seed: int) -> list[Example]:
    """Shared valid/test files; train generated from `seed`, kept apart from valid and test."""
    folder = _data_dir(data_root, "mult", f"{digits}x{digits}")
    if split != "train":
        return read_examples(folder / f"{split}.txt", fmt="mult", limit=n)
    held_out = {
        example.question for name in ("valid", "test") for example in read_examples(folder / f"{name}.txt", fmt="mult")
    }
    return generate_mult(n_train if n is None else n, digits, seed, exclude=held_out)


def load_task(
    name_or_path: str,
    split: str,
    *,
    data_root: str = "../shared/data",
    synthetic: SyntheticTask | None = None,
    n: int | None = None,
    seed: int = 0,
    n_train: int = 20000,
    n_valid: int = 500,
    n_test: int = 500,
) -> list[Example]:
    """The examples of one split of a task.

    - "synthetic": synthetic_splits of `synthetic` (default SyntheticTask()); the split has
      n_train/n_valid/n_test examples, or n when given. Splits never share a question.
    - "gsm8k": train = gsm8k_train_split, valid = gsm8k_aug/valid.txt, test = gsm8k_aug/test.txt.
    - "mult4"/"mult5": valid/test from mult/4x4 or mult/5x5; train (n_train) is generated
      from `seed`, without the valid/test questions.
    Your own files go through `file_splits` instead, which holds out the splits not given.
    For the shared tasks n keeps the first n examples; `seed` matters for synthetic and mult train.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name_or_path == "synthetic":
        size = n if n is not None else {"train": n_train, "valid": n_valid, "test": n_test}[split]
        sizes = {f"n_{name}": size if name == split else 0 for name in SPLITS}
        return synthetic_splits(synthetic or SyntheticTask(), **sizes, seed=seed)[split]
    if name_or_path == "gsm8k":
        if split == "train":
            train = gsm8k_train_split(
                _data_dir(data_root, "gsm8k", "train.jsonl"), _data_dir(data_root, "gsm8k_aug", "valid.txt")
            )
            return train if n is None else train[:n]
        return read_examples(_data_dir(data_root, "gsm8k_aug", f"{split}.txt"), fmt="aug", limit=n)
    if name_or_path in ("mult4", "mult5"):
        return _mult_split(int(name_or_path[-1]), split, data_root, n, n_train, seed)
    raise ValueError(f"unknown task {name_or_path!r}: expected one of {TASKS} (data files: file_splits)")


def load_splits(config: "RunConfig") -> dict[str, list[Example]]:
    """The task's train, valid and test examples (capped by n_train, n_valid, n_test); a
    training question that reappears in valid or test is refused unless task.allow_overlap."""
    t = config.task
    caps = {"train": t.n_train, "valid": t.n_valid, "test": t.n_test}
    if t.name == "files":
        splits = file_splits(t.train, t.valid, t.test, holdout=t.holdout, seed=t.seed)
        splits = {name: examples[: caps[name]] for name, examples in splits.items()}
    else:
        synthetic = SyntheticTask(n_steps=t.n_steps, max_operand=t.max_operand, max_result=t.max_result,
                                  p_independent=t.p_independent)
        sizes = {"n_train": t.n_train or 20000, "n_valid": t.n_valid, "n_test": t.n_test or 500}
        common = dict(data_root=t.data_root, synthetic=synthetic, seed=t.seed, **sizes)
        splits = {name: load_task(t.name, name, n=caps[name], **common) for name in ("train", "valid", "test")}
    if not t.allow_overlap:
        check_disjoint(splits, {"train": t.train, "valid": t.valid, "test": t.test})
    return splits
