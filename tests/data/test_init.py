"""The data package's entry point (data/__init__.py): load_task's errors, a file path given as
the task, and the splits of the synthetic and shared tasks."""

import pytest

from system15.data import SyntheticTask, load_task, write_aug_lines
from tests.helpers import DATA_ROOT as DATA
from tests.helpers import ROOT, needs_shared_data


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


@needs_shared_data
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


@needs_shared_data
def test_default_data_root_is_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert len(load_task("gsm8k", "valid")) == 500


def test_load_task_synthetic():
    task = SyntheticTask(n_steps=3)
    test = load_task("synthetic", "test", synthetic=task, seed=4)
    assert len(test) == 500 and all(len(e.steps) == 3 for e in test)
    train = load_task("synthetic", "train", synthetic=task, seed=4, n=1000)
    assert len(train) == 1000 and not {e.question for e in test} & {e.question for e in train}
    assert load_task("synthetic", "valid", n=10) == load_task("synthetic", "valid")[:10]
