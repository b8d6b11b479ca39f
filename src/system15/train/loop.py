"""The one training loop: every method, single or multi-process (accelerate), resumable.

Data order is a seeded permutation per epoch, cut into global batches; each process takes
its own slice of each global batch, so N processes x B examples follow the same trajectory
as 1 process x N*B. Checkpoints (checkpoint.py) are sealed and atomic; the model that scores
best on validation is kept in `<run_dir>/best`, and `<run_dir>/done.json` marks the stage as
finished so a ladder can skip it on a re-run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import latest_good, load_training_state, prune, save_training_state, verify, write_atomic
from ..config import TrainConfig
from ..layout import Encoded
from .objective import Objective


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def global_batch(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: epochs are seeded permutations."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def is_done(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    if not (run_dir / "done.json").exists():
        return False
    try:
        verify(run_dir / "best")
        return True
    except Exception:
        return False


def fit(model, objective: Objective, train: list[Encoded], cfg: TrainConfig, run_dir: str | Path,
        validate: Callable[[object], float] | None = None, accelerator=None, quiet: bool = False) -> dict:
    """Train `model` with `objective`; returns the summary also written to done.json."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    objective.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    wrapped, opt = accelerator.prepare(model, opt)
    main = accelerator.is_main_process
    state = {"step": 0, "best": -1.0, "best_step": -1, "seconds": 0.0}
    resumed = latest_good(run_dir)
    if resumed is not None:
        state = load_training_state(resumed, model, opt)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"method": objective.name, "train": vars(cfg), "config": model.config.to_dict(),
                  "version": __version__, "git": git_revision(), "seed": cfg.seed, "processes": accelerator.num_processes}
        (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.batch_size} must divide evenly over {world} processes")

    def evaluate_and_checkpoint(step: int) -> None:
        model.eval()
        if validate is not None and main:
            score = validate(model)
            log({"step": step, "valid_accuracy": score})
            if score > state["best"]:
                state.update(best=score, best_step=step)
                write_atomic(run_dir / "best", model.save)
        elif main and validate is None:
            write_atomic(run_dir / "best", model.save)
        model.train()
        if main:
            save_training_state(run_dir / "checkpoints" / f"step-{step:07d}", model, opt, state)
            prune(run_dir)
        accelerator.wait_for_everyone()

    def log(entry: dict) -> None:
        if main:
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {objective.name}", disable=quiet or not main,
               dynamic_ncols=True)
    began = time.perf_counter() - state["seconds"]
    step = state["step"]
    while step < cfg.steps:
        objective.on_step(step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        idx = global_batch(len(train), step, cfg.batch_size, cfg.seed)
        share = len(idx) // world
        examples = [train[i] for i in idx[rank * share:(rank + 1) * share]]
        batch = to_device(objective.collate(model, examples), accelerator.device)
        loss, metrics = wrapped(objective, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{objective.name}: loss is {loss.item()} at step {step}; "
                                f"last good checkpoint: {latest_good(run_dir) or 'none'} (left untouched)")
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        state["step"] = step
        state["seconds"] = time.perf_counter() - began
        log({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        out_of_time = cfg.max_minutes is not None and state["seconds"] > 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            evaluate_and_checkpoint(step)
        if out_of_time:
            break
    bar.close()
    summary = {"method": objective.name, "steps": step, "seconds": round(state["seconds"], 1),
               "best_valid_accuracy": state["best"], "best_step": state["best_step"]}
    if main:
        (run_dir / "done.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
