"""Crash-safe resume: a run killed with SIGKILL mid-training and resumed with the same run
directory ends with exactly (bitwise) the weights and loss log of an uninterrupted run, also
when its newest checkpoint is damaged and resume has to fall back to the one before."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from system15.checkpoint import verify
from system15.train.loop import fit, global_batch

from tests.helpers import child_env
from tests.helpers.tiny_run import tiny_config, tiny_setup

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The killed subprocess runs on one thread; so must the in-process runs, for bitwise
    equality (and speed: a shared 2-core machine makes 2 threads slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(run_dir: Path, steps: int = STEPS):
    config = tiny_config(steps=steps, eval_every=EVERY)
    model, objective, encoded, _ = tiny_setup(config)
    fit(model, objective, encoded, config.stage("cot"), run_dir, quiet=True)
    return model


def losses(run_dir: Path) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in entries if "loss" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference") / "run"
    return d, {k: v.clone() for k, v in run(d).state_dict().items()}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed (SIGKILL) right after its step-20 checkpoint appeared, before step 40."""
    d = tmp_path_factory.mktemp("killed") / "run"
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.tiny_run", str(d), "--steps", str(STEPS),
                             "--eval-every", str(EVERY), "--sleep", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target, deadline = d / "checkpoints" / "step-0000020", time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"run ended by itself (rc {proc.returncode}): {err.decode()[-2000:]}"
    assert target.exists() and not (d / "done.json").exists()
    assert max(step for step, _ in losses(d)) < STEPS
    return d


def assert_same_weights(model, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), f"{name} differs after resume"


def test_data_order_is_a_pure_function_of_step_and_seed():
    assert global_batch(64, 17, 8, 3) == global_batch(64, 17, 8, 3)
    assert global_batch(64, 17, 8, 3) != global_batch(64, 17, 8, 4)
    epoch = sorted(i for step in range(8) for i in global_batch(64, step, 8, 0))
    assert epoch == list(range(64)), "one epoch visits every example once"


def test_killed_run_resumes_to_bitwise_equal_weights(reference, killed, tmp_path):
    ref_dir, ref_weights = reference
    d = Path(shutil.copytree(killed, tmp_path / "run"))
    (d / "checkpoints" / ".step-0000030.tmp-deadbeef").mkdir()  # as if killed while writing
    with open(d / "log.jsonl", "a") as f:
        f.write('{"step": 23, "lo')  # ... or while logging
    model = run(d)
    assert_same_weights(model, ref_weights)
    assert losses(d) == losses(ref_dir), "the log must read as one uninterrupted run"
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [e["resumed_from"] for e in log if "resumed_from" in e] == [str(d / "checkpoints" / "step-0000020")]
    assert json.loads((d / "done.json").read_text())["steps"] == STEPS
    assert not list((d / "checkpoints").glob(".*")), "unfinished temp folder not cleared"
    verify(d / "best")


def test_resume_falls_back_past_a_damaged_checkpoint(reference, killed, tmp_path):
    _, ref_weights = reference
    d = Path(shutil.copytree(killed, tmp_path / "run"))
    weights = d / "checkpoints" / "step-0000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = run(d)
    assert any("step-0000020" in str(w.message) and "checksum mismatch" in str(w.message) for w in caught)
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [e["resumed_from"] for e in log if "resumed_from" in e] == [str(d / "checkpoints" / "step-0000010")]
    assert_same_weights(model, ref_weights)


def test_finished_run_is_not_trained_again(reference, tmp_path):
    ref_dir, ref_weights = reference
    d = Path(shutil.copytree(ref_dir, tmp_path / "run"))
    before = (d / "log.jsonl").read_text()
    model = run(d)
    assert_same_weights(model, ref_weights)  # loaded from the step-40 checkpoint, no step taken
    assert [line for line in (d / "log.jsonl").read_text().splitlines() if '"loss"' in line] == \
           [line for line in before.splitlines() if '"loss"' in line]
