"""The one training loop: every method, single or multi-process (accelerate), resumable.

Data order is a seeded permutation per epoch, cut into global batches; each process takes
its own slice of each global batch, so N processes x B examples follow the same trajectory
as 1 process x N*B, and the logged loss is the mean over all processes (the loss of the
global batch). Checkpoints (checkpoint.py) are sealed and atomic; the model that scores
best on validation is kept in `<run_dir>/best`, and `<run_dir>/done.json` marks the stage as
finished so a ladder can skip it on a re-run.

A step forces no host sync: losses stay on the device, and the host reads them every
LOG_EVERY steps and before every validation and checkpoint (`check`). A NaN/inf loss or
gradient norm found there stops the run before any checkpoint after it, and puts the last
good checkpoint back into the model, so the last checkpoint is the last good state. With
`fit(compile=True)` the step's forward and loss run through `torch.compile`. done.json
records the trained tokens a second and, on a GPU in the table, the model-FLOPs
utilisation (`PEAK_FLOPS`). With `train.ema`,
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
from ..flops import training_flops_per_token
from .objective import Objective, metrics_on_device
from .optim import build_optimizer

LOG_FILE = "log.jsonl"  # a run folder's training log, one JSON entry a line
LOG_EVERY = 25  # steps between the host's reads of the losses (each waits for the device to catch up)
COMPILE_BACKEND = "inductor"  # torch.compile's backend for fit(compile=True)
# Dense bf16/fp16 tensor-core peaks in FLOP/s by device name: the denominator of the
# model-FLOPs utilisation (MFU). None elsewhere (a CPU, fp32, a card not listed).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


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
    """`batch` on `device`. Onto a GPU through pinned memory, without waiting for the copy: a
    plain copy from pageable memory would make the host wait for the device's queue."""
    if torch.is_tensor(batch):
        if torch.device(device).type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
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


def global_mean(accelerator, loss: torch.Tensor, metrics: dict) -> tuple[torch.Tensor, list[str], dict]:
    """Loss and numeric metrics (floats, or tensors as `objective.scalars` keeps them) averaged
    over processes (one all-reduce), left on the device: [loss, *metrics], the values of the
    global batch, identical on every process, so all of them agree on a non-finite loss. Returns
    them, the metrics' keys, and the other metrics (a curriculum's stage). Every process must
    report the same metric keys."""
    keys = [k for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, float)]
    values = torch.stack([loss.detach().double().reshape(())] +
                         [torch.as_tensor(metrics[k], dtype=torch.float64, device=loss.device).reshape(()) for k in keys])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "mean")
    return values, keys, {k: v for k, v in metrics.items() if k not in keys}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision` (PEAK_FLOPS: bf16/fp16 on a listed GPU), else None."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def batch_tokens(batch) -> int:
    """Positions a step's batch feeds the backbone: the set entries of its `*visible` masks,
    counted on the host before the batch moves (latent steps are not counted)."""
    if isinstance(batch, dict):
        return sum(int(v.sum()) if torch.is_tensor(v) and k.endswith("visible") else batch_tokens(v)
                   for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return sum(batch_tokens(v) for v in batch)
    return 0


def step_forward(wrapped, compile: bool):
    """The step's forward and loss, `wrapped(objective, batch)`: through torch.compile when
    asked (dynamic shapes, since every batch has its own lengths; a curriculum's stage or a
    warm start's number of latent steps compiles once per value)."""
    if not compile:
        return wrapped
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(wrapped, backend=COMPILE_BACKEND, dynamic=True)


def train_step(forward, objective: Objective, batch: dict, accelerator, opt, params, grad_clip: float):
    """One optimizer step on `batch` (collated, on the host): forward and loss, backward, the
    gradient clipped (its norm measured either way), the update. Returns the loss, the metrics
    and the norm, on the device. The loop and recipes/gsm8k_gpu/probe.py both step through it."""
    loss, metrics = forward(objective, to_device(batch, accelerator.device))
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(params, grad_clip or math.inf)  # inf: measure only
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, metrics, norm


def fit(model, objective: Objective, train: list[Encoded], cfg: TrainConfig, run_dir: str | Path,
        validate: Callable[[object], float] | None = None, accelerator=None, quiet: bool = False,
        provenance: dict | None = None, run_config: dict | None = None, compile: bool = False) -> dict:
    """Train `model` with `objective`; returns the summary also written to done.json.

    `validate(model)` is called on every process (same weights, same score); it may split
    its work with `system15.distributed.shard_map`. Only the main process writes files.
    `provenance` (where the starting weights came from) and `run_config` (the whole run's
    settings, which `rungs.check_reusable` reads back) join run.json. `compile`: the step's
    forward and loss through torch.compile (`step_forward`).

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
        return _train(model, objective, train, cfg, run_dir, validate, accelerator, quiet, provenance, run_config,
                      compile)


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
           accelerator, quiet: bool, provenance: dict | None, run_config: dict | None, compile: bool) -> dict:
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

    def stop(what: str, value: float, step: int, rate: float, last: int) -> NonFiniteLoss:
        """The error for a non-finite value at `step` (0-based), found at the check after step
        `last`; the model gets the last good checkpoint back first (the steps after the bad one
        moved its weights on NaN)."""
        good = latest_good(run_dir)
        if good is not None:
            load_training_state(good, model, opt)
            if average is not None:
                average.load(load_average(good), str(good))
        return NonFiniteLoss(f"{objective.name}: {what} is {value} at step {step + 1} (lr {rate:.3g}); found at the "
                             f"check after step {last}, before any checkpoint after it; last good checkpoint: "
                             f"{good or 'none'} (left untouched, and put back into the model)")

    flops_per_token = training_flops_per_token(model)
    peak = peak_flops(accelerator.device, accelerator.mixed_precision)
    for key in ("tokens", "train_seconds"):  # a checkpoint written before they were counted has neither
        state.setdefault(key, 0)
    taken: list[tuple] = []  # the steps since the last check: (step, lr, device values [loss, norm, *metrics], keys, other)
    window = {"tokens": 0, "began": time.perf_counter()}  # training since the last check, validation left out

    def check(last: int) -> None:
        """Read the losses of the steps taken since the last check (one transfer, which waits for
        the device), stop at the first non-finite one, and log the others; the last entry also
        gets the tokens a second (and MFU) since the last check."""
        if not taken:
            return
        rows = torch.stack([values for _, _, values, _, _ in taken]).tolist()
        seconds = time.perf_counter() - window["began"]
        entries = []
        for (step, rate, _, keys, other), (loss, norm, *values) in zip(taken, rows):
            for what, value in (("loss", loss), ("gradient norm", norm)):
                if not math.isfinite(value):
                    for entry in entries:
                        log(entry)
                    taken.clear()
                    raise stop(what, value, step, rate, last)
            entries.append({"step": step + 1, "loss": loss, "lr": rate, "grad_norm": norm, **dict(zip(keys, values)), **other})
        state["tokens"] += window["tokens"]
        state["train_seconds"] += seconds
        rates = throughput(window["tokens"], max(seconds, 1e-9), flops_per_token, peak)
        entries[-1]["tokens_per_second"] = rates["tokens_per_second"]
        if peak is not None:
            entries[-1]["mfu"] = rates["mfu"]
        for entry in entries:
            log(entry)
        bar.set_postfix(loss=f"{entries[-1]['loss']:.3f}")
        taken.clear()
        window.update(tokens=0, began=time.perf_counter())

    model.train()
    forward = step_forward(wrapped, compile)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {objective.name}", disable=quiet or not main,
               dynamic_ncols=True)
    began = time.perf_counter() - state["seconds"]
    step = state["step"]
    with metrics_on_device():
        while step < cfg.steps:
            objective.on_step(step, cfg.steps)
            if objective.resets_optimizer(step, cfg.steps):
                opt.state.clear()  # moments and step counts start again, as a new optimizer's would
            rate = learning_rate(cfg, step, state["seconds"])
            for group, scale in zip(opt.param_groups, lr_scales):
                group["lr"] = rate * scale
            idx = global_batch(len(train), step, cfg.batch_size, cfg.seed)
            share = len(idx) // world
            examples = [train[i] for i in idx[rank * share:(rank + 1) * share]]
            batch = objective.collate(model, examples)
            window["tokens"] += batch_tokens(batch) * world  # every process's share is about as long
            loss, metrics, norm = train_step(forward, objective, batch, accelerator, opt, params, cfg.grad_clip)
            values, keys, other = global_mean(accelerator, loss, metrics)
            norm = torch.as_tensor(norm, dtype=torch.float64, device=values.device).reshape(1)
            taken.append((step, rate, torch.cat([values[:1], norm, values[1:]]), keys, other))
            if average is not None:
                average.update()
            step += 1
            state["step"] = step
            state["seconds"] = time.perf_counter() - began
            if world > 1:  # one clock for all: the learning rate and the stop must agree across processes
                state["seconds"] = float(accelerator.reduce(torch.tensor(state["seconds"], device=accelerator.device), "max"))
            bar.update(1)
            out_of_time = cfg.max_minutes is not None and state["seconds"] > 60 * cfg.max_minutes
            boundary = step % cfg.eval_every == 0 or step == cfg.steps or out_of_time
            if boundary or step % LOG_EVERY == 0:
                check(step)
            if boundary:
                evaluate_and_checkpoint(step)
                window["began"] = time.perf_counter()
            if out_of_time:
                break
    bar.close()
    # milliseconds kept: rungs._cap_did_not_bind compares them with a cap, and a tiny run's
    # seconds rounded to tenths could read 0.0
    summary = {"method": objective.name, "steps": step, "seconds": round(state["seconds"], 3),
               "best_valid_accuracy": state["best"], "best_step": state["best_step"],
               **throughput(state["tokens"], state["train_seconds"], flops_per_token, peak), "compiled": compile}
    if main:
        write_text_atomic(run_dir / "done.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def throughput(tokens: int, seconds: float, flops_per_token: int, peak: float | None) -> dict:
    """done.json's throughput: trained tokens, the seconds they took (validation and
    checkpoints left out; compilation and warm-up in), tokens a second and, where the device's
    peak is known, the model-FLOPs utilisation (6 N FLOPs a token, `flops.training_flops_per_token`)."""
    rate = tokens / seconds if seconds > 0 else None
    return {"train_tokens": tokens, "train_seconds_without_validation": round(seconds, 3), "tokens_per_second": rate,
            "model_flops_per_token": flops_per_token,
            "mfu": rate * flops_per_token / peak if rate is not None and peak is not None else None}
