"""load_task's errors, and a file path given as the task."""

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


def test_a_file_path_is_never_its_own_test_set(tmp_path):
    """A data file named as the task is the one-file form of task.train: valid and test are
    held out of it (system15.data.files), never read from it whole."""
    from system15.config import load_config

    path = tmp_path / "mine.txt"
    write_aug_lines(SyntheticTask().generate(5, seed=0), path)
    with pytest.raises(ValueError, match="file_splits"):
        load_task(str(path), "test")
    task = load_config(None, [f"task.name={path}"]).task
    assert (task.name, task.train, task.valid, task.test) == ("files", str(path), None, None)
