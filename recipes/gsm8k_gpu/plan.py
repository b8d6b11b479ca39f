"""Fit the GSM8K ladder into one GPU window: measured costs in, each rung's training settings out.

Pure: no torch, no clock. `run.py` measures the costs in its first seconds (`probe.py`), and
calls `plan` again before every rung with the seconds then left, so a rung that ran long
takes its overrun out of the rungs after it, and the measuring at the end keeps its time.

The window holds, besides training (each figure from `Costs`):
- per rung: loading its model, and its VALIDATIONS of the valid split, each with a checkpoint;
- at the end: every rung's test decoding, the batch-1/8/64 timing, and our full path against
  HF `generate` at batch 1;
- SLACK, for what no measurement covers (writing files, Python's start, noise).
What is left trains the rungs, in the shares of SHARE; each rung's steps are its seconds over
its measured step cost, and its wall-clock cap (`max_minutes`, with `decay_by: budget`) ends it
where the measurement was wrong, with its learning rate annealed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CORE = ("cot", "nocot", "latent", "system15")  # the rungs, in ladder order
EXTRAS = ("pause", "coconut")  # only if time remains after the core is measured
SHARE = {"cot": 0.35, "nocot": 0.10, "latent": 0.35, "system15": 0.20, "pause": 0.5, "coconut": 0.5}
TIMED_AS = {"cot": "cot", "nocot": "nocot", "pause": "cot", "coconut": "latent", "latent": "latent", "system15": "system15"}
# validations per rung: the long rungs at halfway and at the end (the better is kept); the short
# ones, and Coconut (whose model counts only once its curriculum ends), at the end
VALIDATIONS = {"cot": 2, "latent": 2, "nocot": 1, "system15": 1, "pause": 1, "coconut": 1}
MIN_STEPS = 2
MAX_EPOCHS = 8  # never more passes over the training set, however fast the card
SLACK_SECONDS, SLACK_SHARE = 10.0, 0.05
# Decoding steps budgeted per batch. A batch runs until its slowest row stops: CoT's until
# max_new_tokens, a latent rung's (K thoughts, a short answer) LATENT_DECODE_STEPS. A single
# question stops at its own end: CoT's after its chain (about 42 steps on average in
# results/gsm8k_smollm2), a latent rung's after a few.
LATENT_DECODE_STEPS = 40
SINGLE_DECODE_STEPS = {"cot": 64, "latent": 16}
CAP_MARGIN = 1.15  # a rung's wall-clock cap over its planned seconds
MIN_EXTRA_SECONDS = 20.0  # training seconds an extra rung needs to be worth its measuring


@dataclass(frozen=True)
class Costs:
    """What `probe.py` measured on the machine that trains."""

    step_seconds: dict[str, float]  # method -> seconds a steady training step takes at batch[method]
    batch: dict[str, int]  # method -> the batch size it was timed at, the one it trains at
    decode_step_seconds: dict[int, float]  # batch size -> seconds a decoding step takes (at 1 and eval.batch_size)
    load_seconds: float  # building a rung's model
    checkpoint_seconds: float  # writing a checkpoint and `best`
    warmup_seconds: dict[str, float] = field(default_factory=dict)  # method -> paid once a rung (first steps)
    compiled_step_seconds: dict[str, float] = field(default_factory=dict)  # method -> steady step, compiled
    compile_seconds: dict[str, float] = field(default_factory=dict)  # method -> compiling, paid once a rung


@dataclass(frozen=True)
class Work:
    """What the recipe asks of the window besides training."""

    n_train: int
    n_valid: int
    n_test: int
    eval_batch: int
    max_new_tokens: int
    timing_batch_sizes: tuple[int, ...] = (1, 8, 64)
    timing_examples: int = 8
    timing_rounds: int = 1
    hf_steps: int = 32  # speed.run_speed at batch 1: HF generate against our full path
    hf_rounds: int = 3


def decode_step(costs: Costs, batch: int) -> float:
    """Seconds of one decoding step at `batch`: the measured points, linear between them."""
    points = sorted(costs.decode_step_seconds.items())
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    b, t = points[-1]
    return t * batch / b


def decode_seconds(costs: Costs, work: Work, method: str, examples: int, batch: int) -> float:
    kind = "cot" if method == "cot" else "latent"
    steps = SINGLE_DECODE_STEPS[kind] if batch == 1 else work.max_new_tokens if kind == "cot" else LATENT_DECODE_STEPS
    return math.ceil(examples / batch) * min(steps, work.max_new_tokens) * decode_step(costs, min(batch, examples))


def rung_overhead(costs: Costs, work: Work, method: str, compiled: bool = False) -> float:
    """A rung's seconds besides its training steps: its model, warm-up (or compiling), validations."""
    warm = costs.compile_seconds.get(method, 0.0) if compiled else costs.warmup_seconds.get(method, 0.0)
    valid = decode_seconds(costs, work, method, work.n_valid, work.eval_batch) + costs.checkpoint_seconds
    return costs.load_seconds + warm + VALIDATIONS[method] * valid


def measuring_seconds(costs: Costs, work: Work, methods) -> float:
    """Test decoding of `methods`, their timing at every batch size, and the HF comparison."""
    test = sum(decode_seconds(costs, work, m, work.n_test, work.eval_batch) for m in methods)
    timing = work.timing_rounds * sum(decode_seconds(costs, work, m, max(work.timing_examples, b), b)
                                      for m in methods for b in work.timing_batch_sizes)
    # speed.run_speed at batch 1: three configurations a round (HF against ours, ours against itself,
    # skip 0 against ours), two runs each, and three warm-ups; HF's step costs as ours does
    hf = (3 * 2 * work.hf_rounds + 3) * work.hf_steps * decode_step(costs, 1)
    return test + timing + hf


def slack(budget: float) -> float:
    return SLACK_SECONDS + SLACK_SHARE * budget


def step_cost(costs: Costs, method: str, compiled: bool) -> float:
    timed = TIMED_AS[method]
    return costs.compiled_step_seconds[timed] if compiled else costs.step_seconds[timed]


def compiles(costs: Costs, method: str, seconds: float) -> bool:
    """Compile a rung where its `seconds` of training then take more steps, compiling included."""
    timed = TIMED_AS[method]
    if timed not in costs.compiled_step_seconds:
        return False
    eager = seconds / costs.step_seconds[timed]
    compiled = (seconds - costs.compile_seconds.get(timed, 0.0)) / costs.compiled_step_seconds[timed]
    return compiled > 1.1 * eager


def plan(costs: Costs, work: Work, seconds_left: float, budget: float, methods: tuple[str, ...],
         measured_after: tuple[str, ...] = CORE) -> dict:
    """Settings for each rung of `methods` (those not trained yet), from `seconds_left` of the
    window: {method: {batch_size, steps, warmup, eval_every, max_minutes, decay_by, seconds,
    compile}}, and the sums the plan rests on. `measured_after`: the rungs the measuring at the
    end covers (all of them are budgeted, trained or not)."""
    overhead = {m: rung_overhead(costs, work, m) for m in methods}
    fixed = sum(overhead.values()) + measuring_seconds(costs, work, measured_after) + slack(budget)
    train = max(0.0, seconds_left - fixed)
    total_share = sum(SHARE[m] for m in methods) or 1.0
    rungs = {}
    for m in methods:
        seconds = train * SHARE[m] / total_share
        compiled = compiles(costs, m, seconds)
        if compiled:  # its compiling comes out of its own share
            seconds = max(0.0, seconds - costs.compile_seconds.get(TIMED_AS[m], 0.0) + costs.warmup_seconds.get(m, 0.0))
        per_step = step_cost(costs, m, compiled)
        batch = costs.batch[TIMED_AS[m]]
        cap = max(MIN_STEPS, int(MAX_EPOCHS * work.n_train / batch))
        steps = min(cap, max(MIN_STEPS, int(seconds / per_step)))
        valid = decode_seconds(costs, work, m, work.n_valid, work.eval_batch) + costs.checkpoint_seconds
        clock = CAP_MARGIN * (steps * per_step + VALIDATIONS[m] * valid)
        capped = m != "coconut"  # a capped Coconut would stop before its curriculum ends, with no model to keep
        rungs[m] = {"batch_size": batch, "steps": steps, "warmup": max(1, steps // 20),
                    "eval_every": max(1, math.ceil(steps / VALIDATIONS[m])),
                    "max_minutes": round(clock / 60, 3) if capped else None,
                    "decay_by": "budget" if capped else "steps", "seconds": round(steps * per_step, 1),
                    "compile": compiled}
    return {"rungs": rungs, "seconds_left": round(seconds_left, 1), "fixed_seconds": round(fixed, 1),
            "train_seconds": round(train, 1), "overhead_seconds": {m: round(v, 1) for m, v in overhead.items()},
            "measuring_seconds": round(measuring_seconds(costs, work, measured_after), 1), "fits": train > 0}


def extras_fit(costs: Costs, work: Work, seconds_left: float, budget: float) -> tuple[str, ...]:
    """The extra rungs (pause, Coconut) that fit in `seconds_left` once the core is measured:
    each needs its overhead, its test decoding and timing (beside CoT's, timed again with
    them), and at least MIN_EXTRA_SECONDS of training."""
    for extras in (EXTRAS, EXTRAS[:1]):
        need = (sum(rung_overhead(costs, work, m) + MIN_EXTRA_SECONDS for m in extras)
                + measuring_seconds(costs, work, ("cot", *extras)) - measuring_seconds(costs, work, ("cot",))
                + slack(budget) / 2)
        if need <= seconds_left:
            return extras
    return ()


def overrides(rung: dict, method: str) -> list[str]:
    """A rung's plan as `key=value` overrides of the recipe."""
    keys = ("batch_size", "steps", "warmup", "eval_every", "max_minutes", "decay_by")
    out = [f"stages.{method}.{k}={'null' if rung[k] is None else rung[k]}" for k in keys]
    return out + [f"compile={'true' if rung['compile'] else 'false'}"]
