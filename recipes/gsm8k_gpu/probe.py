"""The first seconds of the GPU run: measure what `plan.py` needs, on the machine that trains.

On one fresh backbone: the seconds it takes to build; a decoding step at batch 1 and at
`eval.batch_size` (DECODE_STEPS steps of the full path after a question's prefill, fed fixed
tokens as `speed.decode` does, so that an untrained model's early <eos> cannot cut the count
short; the prefill is spread over them); a checkpoint's writing; and per rung a training
step at the batch it will train at, through the same pieces as `train.loop.fit` (collate, the
move to the device, forward and loss, backward, clipping, the optimizer). On a GPU each rung's
batch is the recipe's, lowered to what fits in MEMORY_SHARE of the card by the activation
memory one small step takes per example. Where asked (`compile_for`), CoT's step is timed
compiled too: the first compiled step's extra time is the compiling, which the CoT rung then
reuses from torch.compile's cache. No-CoT runs the same loss code, so it is given CoT's
compiled-to-eager ratio and its compiling cost (less certain: a cache hit makes it cheaper).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from plan import Costs

from system15.checkpoint import save_training_state, write_atomic
from system15.layout import encode
from system15.model import build_model
from system15.runtime import accelerator_for, autocast, device_for, synchronize
from system15.speed import Start, decode
from system15.train import objective_for
from system15.train.loop import batch_tokens, step_forward, train_step
from system15.train.objective import metrics_on_device
from system15.train.optim import build_optimizer

MEMORY_SHARE = 0.75  # of the card's memory, for a training step's peak
SIZING_BATCH = 8  # the small step that measures memory per example
WARM, TIMED = 2, 3  # steps: warm-up (allocator, autotuning, compiling), then timed
DECODE_STEPS = 32


def probe(config, splits, methods, compile_for=(), warm: int = WARM, timed: int = TIMED, log=print) -> tuple[Costs, dict]:
    """Costs for `plan.plan`, and the report of what was measured (for summary.json)."""
    device = device_for(config)
    report: dict = {"device": str(device), "steps": {"warm": warm, "timed": timed}, "rungs": {}}
    began = time.perf_counter()
    model = build_model(config, [e.text for e in splits["train"]]).to(device)
    synchronize(device)
    load = time.perf_counter() - began
    log(f"probe: model built in {load:.1f} s")
    encoded = [encode(model.tokenizer, e) for e in splits["train"][:2048]]

    model.eval()
    ids = model.tokenizer.encode(splits["valid"][0].question)
    decoding = {}
    for batch in sorted({1, config.eval.batch_size}):
        feed = torch.full((batch, DECODE_STEPS), ids[0], device=device)
        with torch.inference_mode(), autocast(config):
            decode(model, Start.of(model, ids, batch), feed[:, :2])  # warm-up
            synchronize(device)
            t = time.perf_counter()
            seconds = decode(model, Start.of(model, ids, batch), feed)
            prefill = time.perf_counter() - t - seconds
        decoding[batch] = (seconds + prefill) / DECODE_STEPS
        log(f"probe: decoding at batch {batch}: {1000 * seconds / DECODE_STEPS:.1f} ms a step, "
            f"prefill {1000 * prefill:.0f} ms")
    report["decode_step_seconds"] = decoding

    step_seconds, batches, warmup, compiled, compiling = {}, {}, {}, {}, {}
    checkpoint = None
    for method in methods:
        entry, opt = time_rung(model, method, config, encoded, device, warm, timed, method in compile_for, log)
        report["rungs"][method] = entry
        step_seconds[method], batches[method], warmup[method] = entry["step_seconds"], entry["batch"], entry["warmup_seconds"]
        if "compiled_step_seconds" in entry:
            compiled[method], compiling[method] = entry["compiled_step_seconds"], entry["compile_seconds"]
        if checkpoint is None:
            checkpoint = checkpoint_seconds(model, opt, device)
            log(f"probe: a checkpoint and `best` take {checkpoint:.1f} s to write")
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "cot" in compiled and "nocot" in step_seconds and "nocot" not in compiled:
        compiled["nocot"] = step_seconds["nocot"] * compiled["cot"] / step_seconds["cot"]
        compiling["nocot"] = compiling["cot"]
    if "cot" in compiling:
        compiling["cot"] = 0.0  # paid here already: the rung finds its compiled code in the cache
    report.update(load_seconds=load, checkpoint_seconds=checkpoint, seconds=time.perf_counter() - began)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Costs(step_seconds, batches, decoding, load, checkpoint or 0.0, warmup, compiled, compiling), report


def time_rung(model, method: str, config, encoded, device, warm: int, timed: int, compile: bool, log) -> tuple[dict, object]:
    """One rung's training step on `model`, timed at the batch it will train at (and compiled,
    if `compile`); returns what was measured and the optimizer (for the checkpoint's timing)."""
    objective = objective_for(method, config)
    if method == "system15" and model.shortcuts is None:
        model.add_shortcuts()
    objective.prepare(model)
    model.train()
    cfg = config.stage(method)
    accelerator = accelerator_for(config)
    groups = objective.param_groups(model)
    params = [p for g in groups for p in g["params"]]
    opt, _ = build_optimizer(model, groups, cfg)
    wrapped, opt = accelerator.prepare(model, opt)
    taken = [0]

    def steps(n: int, forward, batch: int) -> tuple[float, int]:
        """Seconds of `n` training steps at `batch` (the device waited for), and their tokens."""
        tokens = 0
        synchronize(device)
        t = time.perf_counter()
        with metrics_on_device():
            for _ in range(n):
                examples = [encoded[(taken[0] + i) % len(encoded)] for i in range(batch)]
                taken[0] += batch
                cpu = objective.collate(model, examples)
                tokens += batch_tokens(cpu)
                train_step(forward, objective, cpu, accelerator, opt, params, cfg.grad_clip)
        synchronize(device)
        return time.perf_counter() - t, tokens

    batch = cfg.batch_size
    entry: dict = {"recipe_batch": batch}
    if device.type == "cuda":
        batch, entry["memory"] = fitting_batch(lambda b: steps(1, wrapped, b), cfg.batch_size, device)
    first, _ = steps(warm, wrapped, batch)
    seconds, tokens = steps(timed, wrapped, batch)
    step = seconds / timed
    entry.update(batch=batch, step_seconds=step, example_seconds=step / batch, tokens_per_step=tokens / timed,
                 tokens_per_second=tokens / seconds, warmup_seconds=max(0.0, first - warm * step))
    log(f"probe: {method} at batch {batch}: {step:.3f} s a step, {1000 * step / batch:.1f} ms an example, "
        f"{tokens / seconds:.0f} tokens/s")
    if compile:
        try:
            forward = step_forward(wrapped, True)
            first, _ = steps(1, forward, batch)
            steps(max(0, warm - 1), forward, batch)
            seconds, _ = steps(timed, forward, batch)
            entry.update(compiled_step_seconds=seconds / timed, compile_seconds=max(0.0, first - seconds / timed))
            log(f"probe: {method} compiled: {seconds / timed:.3f} s a step, compiling took {entry['compile_seconds']:.1f} s")
        except Exception as e:  # noqa: BLE001 - the rung trains eager: the run goes on
            entry["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"probe: {method} did not compile: {entry['compile_error']}")
    return entry, opt


def fitting_batch(one_step, recipe_batch: int, device) -> tuple[int, dict]:
    """The recipe's batch, lowered to what fits MEMORY_SHARE of the card: one step at
    SIZING_BATCH gives the memory a step needs per example over what is held between steps."""
    small = min(SIZING_BATCH, recipe_batch)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    one_step(small)
    per_example = max(1, (torch.cuda.max_memory_allocated(device) - held) / small)
    total = torch.cuda.get_device_properties(device).total_memory
    room = MEMORY_SHARE * total - torch.cuda.memory_allocated(device)
    fits = max(small, int(room / per_example) // 8 * 8)
    return min(recipe_batch, fits), {"bytes_per_example": per_example, "held_bytes": held, "total_bytes": total,
                                     "fits": fits}


def checkpoint_seconds(model, opt, device) -> float:
    """Seconds to write a training checkpoint and a `best` model folder, as every validation does."""
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir())) as tmp:
        synchronize(device)
        t = time.perf_counter()
        save_training_state(Path(tmp) / "checkpoint", model, opt, {"step": 0, "best": -1.0, "best_step": -1, "seconds": 0.0})
        write_atomic(Path(tmp) / "best", model.save)
        return time.perf_counter() - t
