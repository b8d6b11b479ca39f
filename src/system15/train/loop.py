"""The one training loop: every method, single or multi-process (accelerate), resumable.

Data order is a seeded permutation per epoch, cut into global batches; each process takes
its own slice of each global batch, so N processes x B examples follow the same trajectory
as 1 process x N*B, and the logged loss is the mean over all processes (the loss of the
global batch). Checkpoints (checkpoint.py) are sealed and atomic; the model that scores
best on validation is kept in `<run_dir>/best`, and `<run_dir>/done.json` marks the stage as
finished so a ladder can skip it on a re-run. A NaN/inf loss or gradient stops the run
before the optimizer step, so the last checkpoint is the last good state. With `train.ema`,
validation and `best` read a moving average of the weights (average.py), and checkpoints keep
it, so a resumed run goes on with the same average. One process at a time trains into a run
folder: `fit` holds its lock (`checkpoint.RunLock`) from start to end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint import (RunLock, RunLockedError, latest_good, load_average, load_training_state, prune, recover,
                          save_training_state, verify, write_atomic, write_text_atomic)
from ..config import TrainConfig
from ..version import __version__
from ..layout import Encoded
from .average import WeightAverage
from .objective import Objective
from .optim import build_optimizer

LOG_FILE = "log.jsonl"  # a run folder's training log, one JSON entry a line


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


def git_revision() -> str:
    """HEAD of the checkout the package runs from, '+dirty' when tracked files differ."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        head = git("rev-parse", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def learning_rate(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Linear warm-up, then a cosine (or linear) decay to `lr_floor` of the peak, over the
    steps; with `decay_by: budget` and a wall-clock cap, over whichever of the two runs out
    first (the `seconds` trained so far against the cap), so a run the clock stops ends
    annealed too."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.decay_by == "budget" and cfg.max_minutes is not None:
        progress = max(progress, seconds / (60 * cfg.max_minutes))
    progress = min(progress, 1.0)
    left = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress  # 1 -> 0
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * left)


def global_batch(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: epochs are seeded permutations.

    A pure function of its arguments, so a resumed run sees the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):  # e.g. stage 1's probes: one batch per latent step
        return type(batch)(to_device(v, device) for v in batch)
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


def ready_for_training(accelerator):
    """Check the launch and set DDP up for our objectives; returns `accelerator`.

    - accelerate made without cpu=True on a CUDA-less machine ignores a multi-process launch:
      every process would train alone and overwrite the others' files. Refuse that.
    - Methods leave some trainable parameters unused (P in CoT, the pause embeddings outside
      the pause baseline), so DDP must look for unused ones, also in a caller's accelerator."""
    from accelerate.utils import DistributedDataParallelKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: "
                           "on a machine without CUDA make the Accelerator (or PartialState) with cpu=True, "
                           "before anything else creates accelerate's state")
    handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
    handler.find_unused_parameters = True
    accelerator.ddp_handler = handler
    return accelerator


def run_record(objective: Objective, cfg: TrainConfig, accelerator, run_config: dict | None) -> dict:
    """What run.json keeps: enough to tell which code, settings and seed made the run."""
    import transformers

    return {"method": objective.name, "train": dataclasses.asdict(cfg), "config": run_config,
            "version": __version__, "git": git_revision(), "seed": cfg.seed,
            "processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
            "torch": torch.__version__, "transformers": transformers.__version__, "argv": sys.argv}


def log_entries(path: Path) -> list[dict]:
    """A training log's entries, in order, without a line cut short by a kill."""
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut short by the kill
            continue
    return entries


def truncate_log(path: Path, step: int) -> None:
    """Drop log entries past `step` (and any torn last line): a resumed run logs those steps again."""
    if path.exists():
        kept = [e for e in log_entries(path) if e.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))


def global_mean(accelerator, loss: torch.Tensor, metrics: dict) -> tuple[float, dict]:
    """Loss and float metrics averaged over processes (one all-reduce): the values of the
    global batch, identical on every process, so all of them agree on a non-finite loss.
    Every process must report the same metric keys."""
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=loss.device)
    reduced = accelerator.reduce(torch.cat([loss.detach().double().reshape(1), values]), "mean").tolist()
    return reduced[0], {**metrics, **dict(zip(keys, reduced[1:]))}


def fit(model, objective: Objective, train: list[Encoded], cfg: TrainConfig, run_dir: str | Path,
        validate: Callable[[object], float] | None = None, accelerator=None, quiet: bool = False,
        provenance: dict | None = None, run_config: dict | None = None) -> dict:
    """Train `model` with `objective`; returns the summary also written to done.json.

    `validate(model)` is called on every process (same weights, same score); it may split
    its work with `system15.distributed.shard_map`. Only the main process writes files.
    `provenance` (where the starting weights came from) and `run_config` (the whole run's
    settings, which `rungs.check_reusable` reads back) join run.json.

    While it trains, the run folder is locked (`checkpoint.RunLock`): a second `fit` into it
    raises RunLockedError, naming the holder's pid, before touching a file."""
    run_dir = Path(run_dir)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    ready_for_training(accelerator)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size={cfg.batch_size} must divide evenly over {accelerator.num_processes} processes")
    with run_lock(run_dir, accelerator):
        return _train(model, objective, train, cfg, run_dir, validate, accelerator, quiet, provenance, run_config)


@contextmanager
def run_lock(run_dir: Path, accelerator):
    """The run folder's lock, held by the main process alone (it writes every file); the
    others learn whether it was taken, so that all of them stop when it was not."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            refused = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise RunLockedError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(model, objective: Objective, train: list[Encoded], cfg: TrainConfig, run_dir: Path, validate,
           accelerator, quiet: bool, provenance: dict | None, run_config: dict | None) -> dict:
    """`fit`'s training, once the run folder is locked."""
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)
    objective.prepare(model)
    groups = objective.param_groups(model)
    params = [p for group in groups for p in group["params"]]
    # each group's rate multiplier stays here, not in the optimizer's groups, which a resumed
    # run takes from its checkpoint (one saved before groups had multipliers has none)
    opt, lr_scales = build_optimizer(model, groups, cfg)
    wrapped, opt = accelerator.prepare(model, opt)
    average = WeightAverage(model, params, cfg.ema) if cfg.ema else None
    main = accelerator.is_main_process
    state = {"step": 0, "best": -1.0, "best_step": -1, "seconds": 0.0}
    resumed = latest_good(run_dir)
    accelerator.wait_for_everyone()  # everyone has chosen before the main process writes
    if main:
        recover(run_dir / "best")
    if resumed is not None:
        state = load_training_state(resumed, model, opt)
        if average is not None:
            average.load(load_average(resumed), str(resumed))
        if main:
            truncate_log(run_dir / LOG_FILE, state["step"])
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LOG_FILE).unlink(missing_ok=True)  # left by a run that died before its first checkpoint
        record = {**run_record(objective, cfg, accelerator, run_config), **(provenance or {})}
        write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2, default=str))

    def log(entry: dict) -> None:
        if main:
            with open(run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")

    if resumed is not None:
        log({"step": state["step"], "resumed_from": str(resumed), "processes": world})

    def evaluate_and_checkpoint(step: int) -> None:
        model.eval()
        with average.applied() if average is not None else nullcontext():  # what validation and `best` see
            if validate is not None:
                score = validate(model)
                log({"step": step, "valid_accuracy": score})
                if objective.replaces_best(score, state["best"]) and objective.selectable(step, cfg.steps):
                    state.update(best=score, best_step=step)
                    if main:
                        write_atomic(run_dir / "best", model.save)
            elif main:
                write_atomic(run_dir / "best", model.save)
        model.train()
        if main:
            save_training_state(run_dir / "checkpoints" / f"step-{step:07d}", model, opt, state,
                                average.tensors() if average is not None else None)
            prune(run_dir)
        accelerator.wait_for_everyone()

    def stop(what: str, value: float, step: int) -> NonFiniteLoss:
        return NonFiniteLoss(f"{objective.name}: {what} is {value} at step {step + 1} (lr {learning_rate(cfg, step, state['seconds']):.3g}); "
                             f"stopped before its optimizer step; last good checkpoint: "
                             f"{latest_good(run_dir) or 'none'} (left untouched)")

    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {objective.name}", disable=quiet or not main,
               dynamic_ncols=True)
    began = time.perf_counter() - state["seconds"]
    step = state["step"]
    while step < cfg.steps:
        objective.on_step(step, cfg.steps)
        rate = learning_rate(cfg, step, state["seconds"])
        for group, scale in zip(opt.param_groups, lr_scales):
            group["lr"] = rate * scale
        idx = global_batch(len(train), step, cfg.batch_size, cfg.seed)
        share = len(idx) // world
        examples = [train[i] for i in idx[rank * share:(rank + 1) * share]]
        batch = to_device(objective.collate(model, examples), accelerator.device)
        loss, metrics = wrapped(objective, batch)
        mean_loss, metrics = global_mean(accelerator, loss, metrics)
        if not math.isfinite(mean_loss):
            raise stop("loss", mean_loss, step)
        accelerator.backward(loss)
        norm = float(accelerator.clip_grad_norm_(params, cfg.grad_clip or math.inf))  # inf: measure only
        if not math.isfinite(norm):
            raise stop("gradient norm", norm, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if average is not None:
            average.update()
        step += 1
        state["step"] = step
        state["seconds"] = time.perf_counter() - began
        if world > 1:  # one clock for all: the learning rate and the stop must agree across processes
            state["seconds"] = float(accelerator.reduce(torch.tensor(state["seconds"], device=accelerator.device), "max"))
        log({"step": step, "loss": mean_loss, "lr": rate, "grad_norm": norm, **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.3f}")
        out_of_time = cfg.max_minutes is not None and state["seconds"] > 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            evaluate_and_checkpoint(step)
        if out_of_time:
            break
    bar.close()
    # milliseconds kept: rungs._cap_did_not_bind compares them with a cap, and a tiny run's
    # seconds rounded to tenths could read 0.0
    summary = {"method": objective.name, "steps": step, "seconds": round(state["seconds"], 3),
               "best_valid_accuracy": state["best"], "best_step": state["best_step"]}
    if main:
        write_text_atomic(run_dir / "done.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
