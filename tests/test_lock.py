"""One writer per run folder: while `fit` trains into a folder, a second `fit` into it is
refused (naming the holder's pid) before it touches a file; a lock left by a killed process is
taken over, and the run resumes from its last checkpoint to the end."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from system15.checkpoint import LOCK, LOCK_GRACE, RunLock, RunLockedError
from system15.train.loop import fit

from conftest import SCRIPTS
from tiny_run import Slow, tiny_config, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(SCRIPTS / "tiny_run.py"), str(run_dir), "--steps", str(STEPS),
                              "--eval-every", str(EVERY), "--sleep", "0.1"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def test_the_lock_is_released_when_fit_raises(tmp_path):
    class Broken(Slow):
        def loss(self, model, batch):
            raise KeyError("broken objective")

    with pytest.raises(KeyError, match="broken objective"):
        tiny_fit(tmp_path / "run", lambda objective: Broken(objective, 0.0))
    assert not (tmp_path / "run" / LOCK).exists()


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
