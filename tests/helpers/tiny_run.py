"""A tiny, fast training run through the real `fit` path, for the resume / distributed /
hygiene tests. Importable (tiny_setup) and runnable as a program, also under
`accelerate launch` (every process runs it; `fit` shards the batches):

    python -m tests.helpers.tiny_run RUN_DIR [--steps 40 --batch 8 --eval-every 10 --sleep 0]

(from the project root, or with it on PYTHONPATH: `tests.helpers.child_env()`).
"""

from __future__ import annotations

import argparse
import json
import time

from system15.config import BackboneConfig, RunConfig, TaskConfig, TrainConfig
from system15.layout import encode
from system15.model import build_model
from system15.data import load_splits
from system15.train.objective import Objective
from system15.train.sft import CoTSFT


def tiny_config(steps: int = 40, batch: int = 8, eval_every: int = 10, seed: int = 0, n_train: int = 64,
                ema: float = 0.0) -> RunConfig:
    """GPT-2 from scratch, 2 layers x 32 wide, on a small synthetic task."""
    train = TrainConfig(steps=steps, batch_size=batch, lr=3e-3, warmup=5, eval_every=eval_every, seed=seed, ema=ema)
    return RunConfig(name="tiny", task=TaskConfig(n_train=n_train, n_valid=7, n_test=7, n_steps=2, max_new_tokens=24),
                     backbone=BackboneConfig(n_layer=2, n_embd=32, n_head=2, n_positions=128),
                     stages={"cot": train}, methods=["cot"])


def tiny_setup(config: RunConfig):
    """(model, CoT objective, encoded train set, splits): deterministic for a given config."""
    splits = load_splits(config)
    texts = [e.text for e in splits["train"]]
    model = build_model(config, texts)
    return model, CoTSFT(config), [encode(model.tokenizer, e) for e in splits["train"]], splits


class Slow(Objective):
    """Delegates to `inner`, sleeping after each loss so a test can kill the run mid-way."""

    def __init__(self, inner: Objective, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.name, self.thought = inner.name, inner.thought

    def prepare(self, model):
        self.inner.prepare(model)

    def on_step(self, step, total):
        self.inner.on_step(step, total)

    def collate(self, model, examples):
        return self.inner.collate(model, examples)

    def loss(self, model, batch):
        time.sleep(self.seconds)
        return self.inner.loss(model, batch)


def main() -> None:
    from system15.train.loop import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()
    config = tiny_config(args.steps, args.batch, args.eval_every)
    model, objective, encoded, _ = tiny_setup(config)
    if args.sleep:
        objective = Slow(objective, args.sleep)
    summary = fit(model, objective, encoded, config.stage("cot"), args.run_dir, quiet=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
