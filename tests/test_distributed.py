"""Multi-process training through the unchanged `fit`, launched by the real `accelerate launch`
on CPU (gloo): 2 processes x B examples follow the loss trajectory of 1 process x 2B, and a
sharded evaluation returns each example exactly once.

Note: `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU launcher only
goes multi-process through MPI); `--multi_gpu` selects the torchrun launcher, and fit's
Accelerator(cpu=True) then joins a gloo process group on a machine without CUDA.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from system15.checkpoint import checkpoints, verify
from system15.distributed import gather, shard, shard_indices, shard_map
from system15.train.loop import fit

from tests.helpers import child_env
from tests.helpers.tiny_run import tiny_config, tiny_setup

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
TOLERANCE = 1e-5  # relative; observed ~2e-7 (gloo's all-reduce sums in another order than one batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*program: str) -> list[str]:
    """`accelerate launch` for 2 CPU processes (the command the README quotes, with a free port)."""
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *program]


NETWORK_FLAKES = ("address already in use", "eaddrinuse", "distnetworkerror", "rendezvous", "connection reset",
                  "connection refused")


def run_launch(command: list[str], timeout: int, cwd: Path | None = None) -> None:
    """Run an `accelerate launch`; a port race in the rendezvous (free_port() hands out a port
    that another process may grab first) earns one retry on a fresh port, nothing else does."""
    env = child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for attempt in range(2):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        if proc.returncode == 0 or attempt or not any(f in output.lower() for f in NETWORK_FLAKES):
            break
        port = command.index("--main_process_port") + 1
        command = [*command[:port], str(free_port()), *command[port + 1:]]
    assert proc.returncode == 0, output


def launch(out: Path, steps: int, batch: int, timeout: int) -> Path:
    run_launch(accelerate_launch("-m", "tests.helpers.ddp_check", str(out), "--steps", str(steps), "--batch", str(batch)),
               timeout)
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in entries if "loss" in e]


def one_process_losses(run_dir: Path, steps: int, batch: int) -> list[tuple[int, float]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(steps=steps, batch=batch, eval_every=10)
        model, objective, encoded, _ = tiny_setup(config)
        fit(model, objective, encoded, config.stage("cot"), run_dir, quiet=True)
    finally:
        torch.set_num_threads(before)
    return losses(run_dir)


def assert_same_trajectory(two: list, one: list, steps: int) -> None:
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, steps + 1))
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(two, one))
    assert worst < TOLERANCE, f"2-process loss differs from 1-process loss by {worst:.2e} (relative)"
    assert one[-1][1] < 0.9 * one[0][1], "the run should learn something"


# -- shard_indices: pure ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shards_cover_every_index_once_in_order(world):
    for n in range(0, 25):
        shards = [shard_indices(n, r, world) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_rejects_nonsense():
    for n, rank, world in [(5, 2, 2), (5, -1, 2), (5, 0, 0), (-1, 0, 1)]:
        with pytest.raises(ValueError, match="shard_indices"):
            shard_indices(n, rank, world)


def test_one_process_shard_map_is_the_identity():
    items = list("abcdefg")
    assert shard(items) == items and gather(items) == items
    assert shard_map(lambda chunk: [c.upper() for c in chunk], items) == list("ABCDEFG")
    with pytest.raises(ValueError, match="returned 1 results for 7 items"):
        shard_map(lambda chunk: chunk[:1], items)


# -- two real processes -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    assert ACCELERATE, "the accelerate command is not installed"
    return launch(tmp_path_factory.mktemp("ddp"), steps=20, batch=8, timeout=300)


def test_two_processes_follow_the_one_process_loss_trajectory(two_processes, tmp_path):
    run = two_processes / "run"
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["distributed"] == "MULTI_CPU", record
    assert_same_trajectory(losses(run), one_process_losses(tmp_path / "one", 20, 8), 20)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
            if "valid_accuracy" in line] == [10, 20], "validation ran once per eval, not once per process"
    verify(run / "best")
    assert [p.name for p in checkpoints(run)] == ["step-0000020", "step-0000010"]


def test_sharded_evaluation_gathers_each_example_exactly_once(two_processes):
    shards = json.loads((two_processes / "shards.json").read_text())
    assert shards["processes"] == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]
    assert shards["took"] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 4], [1, 5], [1, 6]]
    _, _, _, splits = tiny_setup(tiny_config())
    assert shards["sources"] == [e.source for e in splits["valid"]]
    assert len(splits["valid"]) == 7


def test_nan_on_one_process_stops_every_process(two_processes):
    """A NaN on rank 1 only must stop rank 0 too (the check uses the all-reduced loss),
    otherwise rank 0 would wait forever in the next all-reduce."""
    messages = [(two_processes / f"nan-rank{r}.txt").read_text() for r in (0, 1)]
    assert all(m.startswith("NonFiniteLoss: ") and "loss is nan at step 4" in m for m in messages), messages
    assert [p.name for p in checkpoints(two_processes / "nan")] == ["step-0000002"]


def test_the_cli_trains_with_two_processes(tmp_path):
    """The user's path: `accelerate launch ... -m system15.cli train` (rungs.train_rung -> fit with the
    rung's own Accelerator, which fit sets up to find unused parameters)."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    tiny = ["backbone.family=gpt2", "backbone.n_layer=2", "backbone.n_embd=32", "backbone.n_head=2",
            "task.name=synthetic", "task.n_train=64", "task.n_valid=7", "task.max_new_tokens=24",
            "stages.cot={steps: 12, batch_size: 8, eval_every: 6, max_minutes: null}", "device=cpu"]
    run_launch(accelerate_launch("-m", "system15.cli", "train", "--method", "cot", "--runs", str(tmp_path / "runs"),
                                 "--recipe", str(recipe), "name=ddp", *tiny), timeout=300, cwd=tmp_path)
    run = tmp_path / "runs" / "ddp" / "cot"
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert [s for s, _ in losses(run)] == list(range(1, 13))
    verify(run / "best")


@pytest.mark.slow
def test_two_processes_follow_one_process_over_a_long_run(tmp_path):
    out = launch(tmp_path / "ddp", steps=120, batch=16, timeout=600)
    two, one = losses(out / "run"), one_process_losses(tmp_path / "one", 120, 16)
    assert [s for s, _ in two] == [s for s, _ in one]
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(two, one))
    print(f"worst relative loss difference over 120 steps: {worst:.2e}")
    assert worst < TOLERANCE, f"relative difference {worst:.2e} after 120 steps"
