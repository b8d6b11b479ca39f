"""load_task's errors and its file-path mode."""

import pytest

from system15.data import SyntheticTask, load_task, write_aug_lines


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*synthetic.*gsm8k.*mult4.*mult5"):
        load_task("gsm9k", "train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("synthetic", "dev")


def test_missing_data_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_task("gsm8k", "valid", data_root=str(missing))


def test_file_path(tmp_path):
    path = tmp_path / "mine.txt"
    write_aug_lines(SyntheticTask().generate(5, seed=0), path)
    assert [e.answer for e in load_task(str(path), "test")] == [e.answer for e in SyntheticTask().generate(5, seed=0)]
    assert len(load_task(str(path), "test", n=2)) == 2
