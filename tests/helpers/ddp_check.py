"""Run under `accelerate launch` by tests/test_distributed.py; every process runs this module.

1. Trains the tiny model through the unchanged `fit` (batches split over the processes),
   validating with a sharded evaluation of 7 examples (uneven over 2 processes).
2. shard_map over 7 items: which process took which, and what was gathered.
3. A run whose loss is NaN on the last process only: every process must stop (no hang).
Results go to OUT/shards.json (main process) and OUT/nan-rank<R>.txt (each process).

    accelerate launch --multi_gpu --num_processes 2 ... -m tests.helpers.ddp_check OUT --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from system15.distributed import gather, shard_map
from system15.evaluate import accuracy, evaluate
from system15.train.loop import NonFiniteLoss, fit
from tests.helpers.tiny_run import Slow, tiny_config, tiny_setup


class NaNOnLastRank(Slow):
    """Loss is NaN on the last process at step `at`, normal everywhere else."""

    def __init__(self, inner, at: int, rank: int, world: int):
        super().__init__(inner, 0.0)
        self.at, self.poison, self.step = at, rank == world - 1, -1

    def on_step(self, step, total):
        self.step = step
        super().on_step(step, total)

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan"), metrics) if self.poison and self.step == self.at else (loss, metrics)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    config = tiny_config(steps=args.steps, batch=args.batch, eval_every=10)
    model, objective, encoded, splits = tiny_setup(config)
    valid = splits["valid"]

    def validate(m):
        return accuracy(shard_map(lambda chunk: evaluate(m, chunk, K=None, batch_size=4, max_new_tokens=24), valid))

    fit(model, objective, encoded, config.stage("cot"), out / "run", validate, quiet=True)

    took = shard_map(lambda chunk: [(rank, i) for i in chunk], list(range(7)))
    records = shard_map(lambda chunk: evaluate(model, chunk, K=None, batch_size=4, max_new_tokens=24), valid)
    shards = gather([{"rank": rank, "world": world}])
    if rank == 0:
        (out / "shards.json").write_text(json.dumps(
            {"took": took, "sources": [r.source for r in records], "processes": shards}))

    config = tiny_config(steps=10, batch=args.batch, eval_every=2)
    model, objective, encoded, _ = tiny_setup(config)
    try:
        fit(model, NaNOnLastRank(objective, 3, rank, world), encoded, config.stage("cot"), out / "nan", quiet=True)
        result = "finished"
    except NonFiniteLoss as e:
        result = f"NonFiniteLoss: {e}"
    (out / f"nan-rank{rank}.txt").write_text(result)


if __name__ == "__main__":
    main()
