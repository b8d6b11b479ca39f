"""Sealed checkpoints (checkpoint.py): atomic writes, a size + SHA-256 manifest verified on
load, fallback to the previous good checkpoint, and one writer per run folder (the run lock).
Damaged model folders: tests/test_model.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from system15.checkpoint import (LOCK, LOCK_GRACE, MANIFEST, CheckpointError, RunLock, RunLockedError, checkpoints,
                                 latest_good, load_training_state, prune, recover, save_training_state, verify,
                                 write_atomic, write_text_atomic)
from system15.train.loop import fit
from tests.helpers import child_env, copy_of, flip_byte, truncate
from tests.helpers.tiny_run import Slow, tiny_config, tiny_setup


def trained_optimizer(model, objective, encoded, steps: int = 2) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(steps):
        loss, _ = objective.loss(model, objective.collate(model, encoded[4 * i:4 * i + 4]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.fixture(scope="module")
def state_dir(tiny, tmp_path_factory):
    model, objective, encoded = tiny
    opt = trained_optimizer(model, objective, encoded)
    return save_training_state(tmp_path_factory.mktemp("ckpt") / "step-0000002", model, opt, {"step": 2, "best": 0.5})


# -- write_atomic / verify ------------------------------------------------------------------

def test_write_atomic_seals_every_file(tmp_path):
    target = write_atomic(tmp_path / "out", lambda d: ((d / "a.txt").write_text("x"), (d / "sub").mkdir(),
                                                       (d / "sub" / "b.bin").write_bytes(b"\0" * 10)))
    manifest = json.loads((target / MANIFEST).read_text())
    assert set(manifest) == {"a.txt", "sub/b.bin"} and manifest["sub/b.bin"]["size"] == 10
    assert len(manifest["a.txt"]["sha256"]) == 64
    verify(target)


def test_failed_write_leaves_no_target_and_no_temp(tmp_path):
    def fill(d: Path):
        (d / "half.bin").write_bytes(b"123")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_an_existing_target(tmp_path):
    write_atomic(tmp_path / "out", lambda d: (d / "v").write_text("1"))
    write_atomic(tmp_path / "out", lambda d: (d / "v").write_text("2"))
    assert (tmp_path / "out" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
    verify(tmp_path / "out")


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "done.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["done.json"]

    import os

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # the write dies after part of the text went out
    with pytest.raises(OSError):
        write_text_atomic(target, "newer")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["done.json"]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_truncated_file_is_refused_naming_it(state_dir, tmp_path, name):
    d = copy_of(state_dir, tmp_path)
    truncate(d / name)
    with pytest.raises(CheckpointError, match="truncated") as err:
        verify(d)
    assert str(d / name) in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_flipped_byte_is_refused_naming_it(state_dir, tmp_path, name):
    d = copy_of(state_dir, tmp_path)
    flip_byte(d / name)
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        verify(d)
    assert str(d / name) in str(err.value)


def test_missing_file_and_missing_or_garbled_manifest(state_dir, tmp_path):
    d = copy_of(state_dir, tmp_path)
    (d / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: missing"):
        verify(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify(d)


def test_checkpoint_holds_only_safetensors_and_json(state_dir):
    assert {p.suffix for p in state_dir.iterdir()} == {".safetensors", ".json"}


# -- training state ---------------------------------------------------------------------------

def test_training_state_round_trip(tiny, tmp_path):
    model, objective, encoded = tiny
    opt = trained_optimizer(model, objective, encoded)
    torch.manual_seed(123)
    d = save_training_state(tmp_path / "step-0000002", model, opt, {"step": 2, "best": 0.25, "best_step": 2})
    expected_draw = torch.rand(5)

    fresh, fresh_objective, _, _ = tiny_setup(tiny_config(steps=3, batch=4, seed=1))
    fresh_objective.prepare(fresh)
    for p in fresh.parameters():
        p.data.add_(1.0)  # make sure the load really overwrites
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    state = load_training_state(d, fresh, fresh_opt)

    assert state == {"step": 2, "best": 0.25, "best_step": 2}
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for idx, slots in saved["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, loaded["state"][idx][key]), (idx, key)
    assert [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]] == \
           [{k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"} for g in loaded["param_groups"]]
    assert torch.equal(torch.rand(5), expected_draw), "RNG state not restored"


def test_corrupt_state_is_refused_before_the_model_is_touched(tiny, state_dir, tmp_path):
    model, _, _ = tiny
    d = copy_of(state_dir, tmp_path)
    flip_byte(d / "optimizer.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_training_state(d, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latest_good_falls_back_past_damaged_checkpoints(state_dir, tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        copy_of(state_dir, run / "checkpoints").rename(run / "checkpoints" / f"step-{step:07d}")
    flip_byte(run / "checkpoints" / "step-0000030" / "model.safetensors")
    truncate(run / "checkpoints" / "step-0000020" / "state.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_good(run) == run / "checkpoints" / "step-0000010"
    messages = [str(w.message) for w in caught]
    assert any("step-0000030" in m and "checksum mismatch" in m for m in messages)
    assert any("step-0000020" in m and "truncated" in m for m in messages)


def test_latest_good_is_none_without_a_good_checkpoint(state_dir, tmp_path):
    assert latest_good(tmp_path) is None
    copy_of(state_dir, tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / state_dir.name / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        assert latest_good(tmp_path) is None


def test_prune_keeps_the_newest_two_and_clears_unfinished_temp_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step-{step:07d}").mkdir(parents=True)
    (root / ".step-0000005.tmp-deadbeef").mkdir()  # what a kill during write_atomic leaves
    prune(tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000004", "step-0000003"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000004"]


def test_recover_puts_back_the_old_version_after_a_crash_between_renames(tmp_path):
    best = write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v1"))
    best.rename(tmp_path / ".best.old-12345678")  # crashed after moving the old one aside
    (tmp_path / ".best.tmp-87654321").mkdir()  # ... with the new one unfinished
    recover(tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_recover_drops_the_old_version_when_the_new_one_is_in_place(tmp_path):
    write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v1")).rename(tmp_path / ".best.old-1")
    write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v2"))
    recover(tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["best"]


# -- one writer per run folder (RunLock): while `fit` trains into a folder, a second `fit` into it is
# refused (naming the holder's pid) before it touches a file; a lock left by a killed process is
# taken over, and the run resumes from its last checkpoint to the end.

STEPS, EVERY = 30, 10


def tiny_fit(run_dir: Path, objective_wrapper=None) -> dict:
    config = tiny_config(steps=STEPS, eval_every=EVERY)
    model, objective, encoded, _ = tiny_setup(config)
    if objective_wrapper is not None:
        objective = objective_wrapper(objective)
    return fit(model, objective, encoded, config.stage("cot"), run_dir, quiet=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), f"{path} never appeared (rc {proc.poll()})"


def holder(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK).read_text())


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.usefixtures("one_thread")
def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tests.helpers.tiny_run", str(run_dir), "--steps", str(STEPS),
                              "--eval-every", str(EVERY), "--sleep", "0.1"],
                             env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(run_dir / LOCK, first)
        assert holder(run_dir)["pid"] == first.pid and holder(run_dir)["host"] == socket.gethostname()

        with pytest.raises(RunLockedError, match=rf"locked by pid {first.pid} "):
            tiny_fit(run_dir)
        assert holder(run_dir)["pid"] == first.pid, "the refused run must leave the holder's lock alone"

        checkpoint = run_dir / "checkpoints" / "step-0000010"
        wait_for(checkpoint, first)
        first.send_signal(signal.SIGKILL)
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == -signal.SIGKILL, f"run ended by itself: {err.decode()[-2000:]}"
    assert holder(run_dir)["pid"] == first.pid and not (run_dir / "done.json").exists()

    with pytest.warns(UserWarning, match=rf"took over the lock of pid {first.pid}"):
        summary = tiny_fit(run_dir)
    assert summary["steps"] == STEPS
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    resumed = [e["resumed_from"] for e in log if "resumed_from" in e]
    assert len(resumed) == 1 and resumed[0].startswith(str(run_dir / "checkpoints" / "step-"))
    assert not (run_dir / LOCK).exists(), "a finished run releases its lock"


@pytest.mark.usefixtures("one_thread")
def test_the_lock_is_released_when_fit_raises(tmp_path):
    class Broken(Slow):
        def loss(self, model, batch):
            raise KeyError("broken objective")

    with pytest.raises(KeyError, match="broken objective"):
        tiny_fit(tmp_path / "run", lambda objective: Broken(objective, 0.0))
    assert not (tmp_path / "run" / LOCK).exists()


@pytest.mark.usefixtures("one_thread")
def test_a_stale_or_empty_lock_is_taken_over_and_a_live_or_foreign_one_is_not(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="no longer runs"), RunLock(tmp_path):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert not lock.exists()

    lock.write_text("")  # its holder died between creating and writing it
    old = time.time() - 2 * LOCK_GRACE
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning):
        RunLock(tmp_path).acquire().release()
    assert not lock.exists()

    # the same process, again: alive
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=rf"locked by pid {os.getpid()} "):
        RunLock(tmp_path).acquire()

    lock.write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunLockedError, match="on host elsewhere .* delete"):
        RunLock(tmp_path).acquire()
    assert holder(tmp_path)["host"] == "elsewhere"


def _race(run_dir: str, results) -> None:
    try:
        with RunLock(run_dir):
            results.put("won")
            time.sleep(1.0)  # hold it while the others try
    except RunLockedError:
        results.put("refused")


@pytest.mark.usefixtures("one_thread")
def test_of_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    racers = [context.Process(target=_race, args=(str(tmp_path), results)) for _ in range(6)]
    for p in racers:
        p.start()
    for p in racers:
        p.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in racers)
    assert outcomes == ["refused"] * 5 + ["won"]
    assert not (tmp_path / LOCK).exists()
