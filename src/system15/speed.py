"""`system15 speed`: what skipping layers buys in wall-clock time, against what the FLOPs promise.

A benchmark, not a test. On the recipe's backbone (configs/speed.yaml: SmolLM2-135M, all 30
layers) with shortcuts added (untrained routers do for forced patterns), it times decoding
steps after a fixed prompt's prefill, feeding every run the same tokens, so that every run
does the same work but for the layers it skips:

- the full path (route "full");
- the hard route with a FORCED skip mask (`engine.Route.skip`): skip fractions 0..1 of the
  deepest layers ("deep"), of the shallowest ("shallow"), or a seeded random subset per row
  ("mixed"). The routers still run and are read; only their decision is replaced, so skip
  fraction 0 is the routers' cost against the full path;
- a trained System-1.5 model's own routing (`--model DIR`), against that model's full path;
- Hugging Face `generate` on the same model and tokens (greedy, use_cache=True).

Each configuration is timed in turn with the full path, a decoding step of each at a time
(HF `generate` with ours run inside its loop, between two of its steps), for several rounds.
A row's speedup is the median over the rounds of full / pattern within a round (the two runs
saw the same spells of machine speed), and its latencies are that round's; the best (least)
times are kept beside them. Rows report the speedup, the speedup the FLOPs of the whole step
predict (`ideal_speedup`: flops.FlopCounter's count plus the LM head; `ideal_speedup_layers`
leaves the head out) and the efficiency, the share of the predicted time saving that the clock
shows. The full path is also timed against itself the same way (an A/A check of the estimator).
Writes results/<name>/summary.json, summary.md and speedup.png (docs/speed.md).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import KVCache
from .config import ConfigError, RunConfig
from .engine import FULL, Route, decode_step, prefill
from .evaluate import time_in_turn
from .flops import FlopCounter
from .report import device_name
from .runtime import synchronize

PATTERNS = ("deep", "shallow", "mixed")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_STEPS = 32
# A fixed prompt (its tokens are the same for every run): the question of a word problem.
DEFAULT_PROMPT = ("A farmer has 12 cows and buys 7 more. Each cow gives 9 litres of milk a day, and the farmer "
                  "sells each litre for 2 dollars. How many dollars does the farmer make in a week?")
KEEP = "paired median"  # per configuration: the round whose full/pattern ratio is the median (docs/speed.md)
PAIRING = "step"  # a round times a configuration and its full path a decoding step of each in turn
_REPO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "speed.yaml"


def default_recipe() -> str | None:
    """configs/speed.yaml of the folder the command runs in, else of this checkout."""
    if Path("configs/speed.yaml").exists():
        return "configs/speed.yaml"
    return str(_REPO_RECIPE) if _REPO_RECIPE.exists() else None


# -- forced patterns ----------------------------------------------------------------------

def skipped_count(fraction: float, layers: int) -> int:
    """Layers a pattern of `fraction` skips: fraction * layers, halves rounded up."""
    return math.floor(fraction * layers + 0.5)


def skip_mask(pattern: str, fraction: float, rows: int, layers: int, seed: int = 0) -> torch.Tensor:
    """bool [rows, layers], True where the row skips the layer: the deepest layers (deep), the
    shallowest (shallow), or per row its own seeded random subset (mixed: rows take different
    subsets while there are enough); each row skips `skipped_count(fraction, layers)` layers."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"skip fraction must lie in [0, 1], got {fraction}")
    n = skipped_count(fraction, layers)
    mask = torch.zeros(rows, layers, dtype=torch.bool)
    if pattern == "deep":
        mask[:, layers - n:] = n > 0
    elif pattern == "shallow":
        mask[:, :n] = True
    else:
        g, used = torch.Generator().manual_seed(seed), set()
        for row in range(rows):
            for _ in range(100):  # a subset no earlier row took, while any is left
                subset = frozenset(torch.randperm(layers, generator=g)[:n].tolist())
                if subset not in used or len(used) >= math.comb(layers, n):
                    break
            used.add(subset)
            mask[row, sorted(subset)] = True
    return mask


# -- FLOPs --------------------------------------------------------------------------------

def step_flops(counter: FlopCounter, ran_steps: list, prompt_len: int, routed: bool, fill: bool,
               head: int = 0) -> float:
    """Mean FLOPs of one row's decoding step, counted as engine._Ledger counts them: `ran_steps`
    holds per step the [rows][layers] layers that ran; step t attends to prompt_len + t + 1 keys.
    `head`: FLOPs added per row and step (the LM head, which FlopCounter leaves out)."""
    total, rows = 0, 0
    for t, ran in enumerate(ran_steps):
        context = prompt_len + t + 1
        full, skipped = counter.full_layer(context), counter.skipped_layer(fill)
        for row in ran:
            total += sum(full if r else skipped for r in row) + (counter.router() * len(row) if routed else 0) + head
            rows += 1
    return total / max(rows, 1)


def head_flops(model) -> int:
    return 2 * model.backbone.lm.get_output_embeddings().weight.numel()


def efficiency(speedup: float, ideal: float) -> float | None:
    """(time saved) / (time saved if time followed FLOPs) = (1 - 1/speedup) / (1 - 1/ideal):
    1 where ideal is 1; None where ideal < 1 (no layer skipped: the routers only add work,
    and the speedup itself says what they cost)."""
    if ideal == 1:
        return 1.0
    if ideal < 1:
        return None
    return (1 - 1 / speedup) / (1 - 1 / ideal)


# -- timed runs ---------------------------------------------------------------------------

@dataclass
class Start:
    """The state after a prompt's prefill, reused by every run of a batch size (each run
    decodes into a fork of the cache: `KVCache.fork`)."""

    ids: torch.Tensor
    visible: torch.Tensor
    cache: KVCache
    last: torch.Tensor
    prev: list
    positions: torch.Tensor

    @classmethod
    def of(cls, model, prompt_ids: list[int], batch: int) -> Start:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt_ids] * batch, device=device)
        visible = torch.ones_like(ids, dtype=torch.bool)
        return cls(ids, visible, *prefill(model, ids, visible))


class Stepper:
    """One decoding run after `start`, a step at a time: each call runs the next step, feeding
    token feed[:, t] at step t (the step, the head and the greedy choice read on the host, as
    engine.generate reads it for <eos>), and returns its seconds. `record`, when given, gets
    (ran, greedy tokens) per step. The run decodes into a fork of the start's cache."""

    def __init__(self, model, start: Start, feed: torch.Tensor, route: Route = FULL, folded=None,
                 record: list | None = None):
        self.model, self.feed, self.route, self.folded, self.record = model, feed, route, folded, record
        self.cache, self.prev, self.positions, self.t = start.cache.fork(), start.prev, start.positions, 0

    def __call__(self) -> float:
        bb = self.model.backbone
        synchronize()
        began = time.perf_counter()
        res = decode_step(self.model, bb.embed(self.feed[:, self.t]), self.positions, self.cache, self.prev,
                          self.route, self.folded)
        self.prev, self.positions = res.layers, self.positions + 1
        chosen = bb.head(res.hidden).argmax(-1).tolist()
        synchronize()
        seconds = time.perf_counter() - began
        if self.record is not None:
            self.record.append((res.ran, chosen))
        self.t += 1
        return seconds


def decode(model, start: Start, feed: torch.Tensor, route: Route = FULL, folded=None,
           record: list | None = None) -> float:
    """Seconds for feed.shape[1] decoding steps after `start` (`Stepper`)."""
    step = Stepper(model, start, feed, route, folded, record)
    return sum(step() for _ in range(feed.shape[1]))


def hf_generate(model, start: Start, steps: int, between: Callable[[], float] | None = None
                ) -> tuple[torch.Tensor, float, float]:
    """Hugging Face `generate` on the backbone, greedy with its own KV cache, for the prefill
    and `steps` single-position passes (steps + 1 new tokens, <eos> suppressed so every run has
    the same length). Returns (new tokens [B, steps + 1], seconds for the whole call, seconds
    of its `steps` decoding steps: from the prefill's logits to the last step's, timed by a
    logits processor that reads the clock). `between`, when given, runs after each of the
    first `steps` logits (one of our steps between two of HF's) and its time is left out of
    HF's."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.times: list[tuple[float, float]] = []  # per call: when it was entered, when HF resumed
            self.away = 0.0

        def __call__(self, input_ids, scores):
            synchronize()
            entered = resumed = time.perf_counter()
            if between is not None and len(self.times) < steps:
                self.away += between()
                synchronize()
                resumed = time.perf_counter()
            self.times.append((entered, resumed))
            return scores

    tok, stamps = model.tokenizer, Stamps()
    gen = GenerationConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, use_cache=True,
                           pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    synchronize()
    began = time.perf_counter()
    out = model.backbone.lm.generate(input_ids=start.ids, attention_mask=start.visible.long(), generation_config=gen,
                                     logits_processor=LogitsProcessorList([stamps]))
    synchronize()
    total = time.perf_counter() - began - stamps.away
    times = stamps.times
    return out[:, start.ids.shape[1]:], total, sum(b[0] - a[1] for a, b in itertools.pairwise(times))


@dataclass
class Config:
    """One timed configuration of a batch size. `round(full_first)` times one run of it and one
    of its paired full path, step by step in turn, and returns each one's seconds per step."""

    key: str
    round: Callable[[bool], tuple[float, float]]
    times: list = field(default_factory=list)
    full_times: list = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """full / pattern of each round."""
        return [f / t for t, f in zip(self.times, self.full_times)]


def _in_turn(run: Callable[[], Stepper], full: Callable[[], Stepper], steps: int, full_first: bool) -> tuple[float, float]:
    """A run and a full-path run, one step of each in turn (which goes first alternates by
    step): a spell of machine speed, which on a shared CPU lasts longer than a step, falls on
    both. Seconds per step of each."""
    a, b = run(), full()
    ta = tb = 0.0
    for t in range(steps):
        if (t + full_first) % 2:
            tb += b()
            ta += a()
        else:
            ta += a()
            tb += b()
    return ta / steps, tb / steps


def _hf_in_turn(model, start: Start, full: Callable[[], Stepper], steps: int, full_first: bool) -> tuple[float, float]:
    """HF generate and our full path, one step of each in turn: ours runs inside HF's loop,
    between two of its steps (after each, whatever `full_first`: HF's loop sets the order).
    Seconds per step of each."""
    ours = full()
    seconds = [0.0]

    def between():
        seconds[0] += (took := ours())
        return took

    hf = hf_generate(model, start, steps, between)[2]
    return hf / steps, seconds[0] / steps


def _measure(configs: list[Config], rounds: int, desc: str, quiet: bool) -> None:
    """Every configuration, `rounds` times, in turn with its full path step by step (the full
    path first in odd rounds); the seconds per step are appended to each Config."""
    bar = tqdm(total=rounds * len(configs), desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
    enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise; one runs between rounds
    try:
        for r in range(rounds):
            gc.collect()
            for c in configs:
                t, f = c.round(r % 2 == 1)
                c.times.append(t)
                c.full_times.append(f)
                bar.update()
    finally:
        if enabled:
            gc.enable()
        bar.close()


def _paired(c: Config) -> tuple[float, float]:
    """(pattern, full) seconds of the round whose ratio full / pattern is the median of the
    rounds' (the lower median for an even count): a round's two runs are timed in turn, so a
    slow or fast spell of the machine moves both, where the least of each side's times may
    come from different spells."""
    ratios = c.ratios
    pick = ratios.index(statistics.median_low(ratios))
    return c.times[pick], c.full_times[pick]


def _quartiles(c: Config) -> list[float]:
    """The first and third quartiles of the rounds' ratios full / pattern: how far one round
    strays from the median the row reports."""
    ratios = c.ratios
    if len(ratios) < 2:
        return ratios * 2
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]


# -- the benchmark ------------------------------------------------------------------------

def backbone_name(config: RunConfig) -> str:
    bb = config.backbone
    if bb.source == "smollm2":
        name = "SmolLM2-135M"
    elif bb.source == "scratch":
        name = f"scratch {bb.family} {bb.n_layer}x{bb.n_embd}"
    else:
        name = Path(bb.path).stem if bb.source == "gguf" else Path(bb.path).name
    return name + (f" (first {bb.max_layers} layers)" if bb.max_layers else "")


def _check_settings(batch_sizes, steps, rounds, fractions, patterns) -> None:
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ConfigError(f"--batch-sizes: must be integers >= 1, got {batch_sizes}")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ConfigError(f"--batch-sizes: each batch size once, got {batch_sizes}")
    if not (isinstance(steps, int) and steps >= 2):
        raise ConfigError(f"--steps: must be an integer >= 2, got {steps}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ConfigError(f"--rounds: must be an integer >= 1, got {rounds}")
    if not fractions or not all(0.0 <= f <= 1.0 for f in fractions):
        raise ConfigError(f"skip fractions must lie in [0, 1], got {fractions}")
    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown or not patterns:
        raise ConfigError(f"patterns: choose from {PATTERNS}, got {patterns}")


def _load_learned(model_dir, device):
    """A trained model and its own route; small on purpose (the model folder's API may move)."""
    from .model import load_reasoning_model

    model = load_reasoning_model(model_dir).to(device).eval()
    if model.shortcuts is None:
        raise ValueError(f"{model_dir}: this model has no shortcuts (not a System-1.5 model): nothing to route")
    spec = getattr(model, "spec", None)
    if spec is not None:
        depth, policy = spec.lambda_depth, spec.kv_policy
    else:  # folders of the older layout
        depth, policy = model.config.architecture.lambda_depth, model.config.architecture.kv_policy
    return model, Route("hard", depth, policy), f"{Path(model_dir).name} ({model.backbone.family}, {model.num_layers} layers)"


def run_speed(config: RunConfig, *, model=None, model_dir=None, batch_sizes: list[int] | None = None,
              steps: int = DEFAULT_STEPS, rounds: int | None = None, results_root: str | Path = "results",
              command: str = "", fractions=FRACTIONS, patterns=PATTERNS, prompt: str = DEFAULT_PROMPT,
              seed: int = 0, profile: bool = True, quiet: bool = False) -> dict:
    """The benchmark; writes RESULTS/<config.name>/summary.json, summary.md, speedup.png and
    returns the summary. `model`: an already built model (with shortcuts) instead of the
    recipe's; batch sizes and rounds default to the recipe's eval.timing_batch_sizes and
    eval.timing_rounds."""
    from .model import build_model
    from .runtime import autocast, device_for, precision_for

    batch_sizes = list(config.eval.timing_batch_sizes if batch_sizes is None else batch_sizes)
    rounds = config.eval.timing_rounds if rounds is None else rounds
    fractions, patterns = tuple(fractions), tuple(patterns)
    _check_settings(batch_sizes, steps, rounds, fractions, patterns)
    device = device_for(config)
    began = time.perf_counter()
    if model is None:
        model = build_model(config, texts=[prompt])
        model.add_shortcuts()
    elif model.shortcuts is None:
        raise ValueError("the benchmark needs a model with shortcuts (ReasoningModel.add_shortcuts)")
    model = model.to(device).eval()
    learned = _load_learned(model_dir, device) if model_dir is not None else None
    name = backbone_name(config)
    load_before = _load_average()
    with torch.inference_mode(), autocast(config):
        rows, hf, checks, twice = _benchmark(model, name, learned, batch_sizes, steps, rounds, fractions, patterns,
                                             prompt, seed, config.architecture.kv_policy, quiet)
        parts = profile_step(model, prompt, steps, config.architecture.kv_policy,
                             batch=next((b for b in batch_sizes if b > 1), 8)) if profile else None
    layers = model.num_layers
    summary = {
        "backbone": name,
        "device": device_name(device),
        "command": command,
        "rows": rows,
        "hf_generate_ratio": {str(b): v["ratio"] for b, v in hf.items()},
        "hf_generate": {str(b): v for b, v in hf.items()},
        "full_path_agrees_with_hf": checks,
        "full_vs_full": {str(b): v for b, v in twice.items()},
        "targets": targets(rows, hf),
        "profile": parts,
        "settings": {
            "layers": layers, "width": model.backbone.hidden_size, "batch_sizes": batch_sizes, "steps": steps,
            "rounds": rounds, "keep": KEEP, "pairing": PAIRING, "skip_fractions": list(fractions), "patterns": list(patterns),
            "skipped_layers": {str(f): skipped_count(f, layers) for f in fractions}, "seed": seed,
            "kv_policy": config.architecture.kv_policy, "adapter_dim": config.architecture.adapter_dim,
            "router_hidden": config.architecture.router_hidden, "precision": precision_for(config),
            "prompt": prompt, "prompt_tokens": len(model.tokenizer.encode(prompt)),
            "model_dir": None if model_dir is None else str(model_dir),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - began, 1),
            "load_average": {"before": load_before, "after": _load_average()},  # other work on the machine meanwhile
        },
        "flops_note": "ideal_speedup: full-path FLOPs per step / the pattern's, the whole step as the clock times it: "
                      "system15.flops.FlopCounter's count (matrix products of the layers that ran, attention over "
                      "the cache, the routers at every layer, the adapters and K/V fill of skipped layers) plus the "
                      "LM head, which no pattern skips; ideal_speedup_layers leaves the head out.",
    }
    write_results(summary, Path(results_root) / config.name)
    return summary


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _reference(model, prompt: str, batch: int, steps: int) -> tuple[Start, torch.Tensor, torch.Tensor]:
    """The prefilled start of a batch size, HF generate's greedy tokens (steps + 1) and the
    `steps` tokens every run is fed; the HF call is also its warm-up."""
    start = Start.of(model, model.tokenizer.encode(prompt), batch)
    tokens, _, _ = hf_generate(model, start, steps)
    return start, tokens, tokens[:, :steps].contiguous()


def _benchmark(model, name, learned, batch_sizes, steps, rounds, fractions, patterns, prompt, seed, kv_policy, quiet):
    bb = model.backbone
    layers, fill = bb.num_layers, kv_policy == "fill"
    counter, head = FlopCounter.for_model(model), head_flops(model)
    folded = model.shortcuts.folded(bb)
    prompt_len = len(model.tokenizer.encode(prompt))
    if not prompt_len:
        raise ConfigError("the prompt encodes to no tokens")
    rows, hf, checks, twice = [], {}, {}, {}
    for batch in batch_sizes:
        start, tokens, feed = _reference(model, prompt, batch, steps)
        seen: list = []
        decode(model, start, feed, FULL, record=seen)  # warm-up, and our greedy choices against HF's
        checks[str(batch)] = sum(c == tokens[:, t + 1].tolist() for t, (_, c) in enumerate(seen)) / steps
        full = partial(Stepper, model, start, feed)
        configs = [Config("hf", partial(_hf_in_turn, model, start, full, steps)),
                   Config("full", partial(_in_turn, full, full, steps))]  # A/A: the estimator's own bias
        masks = {}  # one measurement per distinct mask: skip 0 and skip 1 are the same for every pattern
        for pattern in patterns:
            for f in fractions:
                masks.setdefault(_key(pattern, f, layers), skip_mask(pattern, f, batch, layers, seed))
        routes = {key: Route("hard", 0.5, kv_policy, skip=mask) for key, mask in masks.items()}
        configs += [Config(key, partial(_in_turn, partial(Stepper, model, start, feed, route, folded), full, steps))
                    for key, route in routes.items()]
        # warm-up of the hard route; a mixed one also makes the engine measure, once per batch size,
        # whether rows that disagree are gathered or all run (engine._gathers), before any timing
        warm = next((key for key in routes if key.startswith("mixed")), list(routes)[len(routes) // 2])
        decode(model, start, feed, routes[warm], folded)
        record: list = []
        if learned is not None:
            lmodel, lroute, _ = learned
            lstart, _, lfeed = _reference(lmodel, prompt, batch, steps)
            lfolded = lmodel.shortcuts.folded(lmodel.backbone)
            decode(lmodel, lstart, lfeed, lroute, lfolded, record=record)  # warm-up, and what the routers chose
            configs.append(Config("learned", partial(_in_turn, partial(Stepper, lmodel, lstart, lfeed, lroute, lfolded),
                                                     partial(Stepper, lmodel, lstart, lfeed), steps)))
        _measure(configs, rounds, f"speed b={batch}", quiet)
        by_key = {c.key: c for c in configs}
        h = by_key["hf"]
        hf_time, full_time = _paired(h)
        hf[batch] = {"ratio": full_time / hf_time, "full_step_ms": 1000 * full_time, "hf_step_ms": 1000 * hf_time,
                     "ratio_of_best": min(h.full_times) / min(h.times),
                     "ratio_quartiles": _quartiles(h)}  # of ours / HF, as the ratio
        once, again = _paired(by_key["full"])
        twice[batch] = {"ratio": again / once, "quartiles": _quartiles(by_key["full"])}
        full_flops = step_flops(counter, [[[True] * layers] * batch] * steps, prompt_len, False, fill)
        for pattern in patterns:
            for f in fractions:
                key = _key(pattern, f, layers)
                ran = [[not s for s in row] for row in masks[key].tolist()]
                flops = step_flops(counter, [ran] * steps, prompt_len, True, fill)
                rows.append(_row(name, batch, pattern, f, skipped_count(f, layers), by_key[key], full_flops, flops,
                                 head, steps))
        if learned is not None:
            rows.append(_learned_row(learned, record, prompt, batch, steps, by_key["learned"]))
    return rows, hf, checks, twice


def _learned_row(learned, record: list, prompt: str, batch: int, steps: int, config: Config) -> dict:
    """A trained model's row: its skip fraction and FLOPs read from the layers its routers ran."""
    lmodel, lroute, label = learned
    counter, layers = FlopCounter.for_model(lmodel), lmodel.num_layers
    prompt_len, fill = len(lmodel.tokenizer.encode(prompt)), lroute.kv_policy == "fill"
    ran_steps = [ran for ran, _ in record]
    full = step_flops(counter, [[[True] * layers] * batch] * steps, prompt_len, False, fill)
    flops = step_flops(counter, ran_steps, prompt_len, True, fill)
    skipped = sum(not r for ran in ran_steps for row in ran for r in row) / (steps * batch * layers)
    return _row(label, batch, "learned", skipped, None, config, full, flops, head_flops(lmodel), steps)


def _key(pattern: str, fraction: float, layers: int) -> str:
    n = skipped_count(fraction, layers)
    return "none" if n == 0 else "all" if n == layers else f"{pattern}-{fraction:g}"


def _row(backbone, batch, pattern, fraction, skipped, c: Config, full_flops, flops, head, steps) -> dict:
    latency, full = _paired(c)
    speedup, layers_only = full / latency, full_flops / flops
    ideal = (full_flops + head) / (flops + head)  # the whole step: the clock times the LM head too
    return {
        "backbone": backbone, "batch_size": batch, "pattern": pattern, "skip_fraction": fraction,
        "latency_ms": 1000 * latency, "full_latency_ms": 1000 * full, "speedup": speedup,
        "ideal_speedup": ideal, "efficiency": efficiency(speedup, ideal),
        "layers_skipped": skipped, "ideal_speedup_layers": layers_only,
        "efficiency_layers": efficiency(speedup, layers_only),
        "latency_best_ms": 1000 * min(c.times), "full_latency_best_ms": 1000 * min(c.full_times),
        "speedup_of_best": min(c.full_times) / min(c.times), "speedup_quartiles": _quartiles(c),
        "measurement": f"b{batch}/{c.key}", "rounds": len(c.times), "steps": steps,
    }


# -- the targets of issue 36 --------------------------------------------------------------

def targets(rows: list[dict], hf: dict) -> list[dict]:
    """The issue's bars, where this run has their figures: efficiency >= 0.8 at skip 0.5 and
    batch 1 (deep, shallow); speedup >= 0.97 at skip 0 (routers only); our full path within
    1.05x of HF generate at batch 1 and 8."""
    out = []

    def row(pattern, f, b):
        return next((r for r in rows if r["pattern"] == pattern and r["skip_fraction"] == f and r["batch_size"] == b), None)

    for pattern in ("deep", "shallow"):
        r = row(pattern, 0.5, 1)
        if r is not None and r["efficiency"] is not None:
            out.append({"target": f"efficiency, {pattern}, skip 0.5, batch 1", "figure": r["efficiency"], "bar": ">= 0.8",
                        "met": r["efficiency"] >= 0.8})
    for b in sorted({r["batch_size"] for r in rows}):
        r = row("deep", 0.0, b) or row("shallow", 0.0, b) or row("mixed", 0.0, b)
        if r is not None:
            out.append({"target": f"speedup, skip 0 (routers only), batch {b}", "figure": r["speedup"], "bar": ">= 0.97",
                        "met": r["speedup"] >= 0.97})
    for b in (1, 8):
        if b in hf:
            out.append({"target": f"our full path / HF generate, batch {b}", "figure": hf[b]["ratio"], "bar": "<= 1.05",
                        "met": hf[b]["ratio"] <= 1.05})
    return out


# -- where a skipped layer's time goes ----------------------------------------------------

class _Probe:
    """Times the parts of decoding steps in place: while active, engine._hard_layer,
    engine.fill_kv, FoldedShortcut.decide / .branch, Backbone.run_layer, _RowsView.update and
    KVCache.append_kv are wrapped by timers (about a microsecond each). The parts timed inside
    one routed layer are booked to that layer's kind, which is known once it returns: skipped
    (every row took the shortcut), ran (no row did) or mixed; append_kv, called after the layer,
    is booked to the layer before it."""

    def __init__(self, bb):
        self.bb, self.stack, self.last, self.totals = bb, [], "full", {}

    def _add(self, bucket: str, part: str, seconds: float) -> None:
        entry = self.totals.setdefault(bucket, {})
        entry[part] = entry.get(part, 0.0) + seconds

    def _wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t
            if part == "append_kv":
                self._add(self.last, part, seconds)
            elif self.stack:
                self.stack[-1][part] = self.stack[-1].get(part, 0.0) + seconds
            else:
                self._add("full", part, seconds)
            return out
        return timed

    def _wrap_layer(self, fn):
        def timed(*args, **kwargs):
            self.stack.append({})
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t
            parts, skipped = self.stack.pop(), out[3]
            self.last = "skipped" if all(skipped) else "ran" if not any(skipped) else "mixed"
            self._add(self.last, "layers", 1)
            self._add(self.last, "total", seconds)
            for part, value in parts.items():
                self._add(self.last, part, value)
            return out
        return timed

    def __enter__(self):
        from . import backbone as backbone_module
        from . import engine
        from .shortcuts import FoldedShortcut

        self.saved = [(engine, "_hard_layer"), (engine, "fill_kv"), (FoldedShortcut, "decide"), (FoldedShortcut, "branch"),
                      (KVCache, "append_kv"), (backbone_module._RowsView, "update")]
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in self.saved]
        engine._hard_layer = self._wrap_layer(engine._hard_layer)
        engine.fill_kv = self._wrap("kv_fill", engine.fill_kv)
        FoldedShortcut.decide = self._wrap("router", FoldedShortcut.decide)
        FoldedShortcut.branch = self._wrap("adapters", FoldedShortcut.branch)
        KVCache.append_kv = self._wrap("append_kv", KVCache.append_kv)
        backbone_module._RowsView.update = self._wrap("attention_kv_cat", backbone_module._RowsView.update)
        self.bb.run_layer = self._wrap("layer", self.bb.run_layer)
        return self

    def __exit__(self, *exc):
        for owner, name, original in self.saved:
            setattr(owner, name, original)
        del self.bb.run_layer  # back to the class's method


def _per_layer(totals: dict, steps: int, layers: int) -> dict:
    """µs per layer of each kind (full: the full route's layers), with `rest`, the time of a
    routed layer no inner timer covers (decision read on the host, gather/scatter, bookkeeping);
    `attention_kv_cat` is part of `layer`; `per_step`: layers of the kind per step."""
    out = {}
    for kind, parts in totals.items():
        n = steps * layers if kind == "full" else parts["layers"]
        entry = {part: 1e6 * v / n for part, v in parts.items() if part not in ("layers", "total")}
        if kind == "full":
            entry["total"] = entry.get("layer", 0.0) + entry.get("append_kv", 0.0)
        else:
            inner = sum(parts.get(part, 0.0) for part in ("router", "adapters", "kv_fill", "layer"))
            entry["rest"] = 1e6 * (parts["total"] - inner) / n
            entry["total"] = 1e6 * parts["total"] / n + entry.get("append_kv", 0.0)
        entry["per_step"] = n / steps
        out[kind] = entry
    return out


@torch.inference_mode()
def profile_step(model, prompt: str, steps: int, kv_policy: str = "fill", batch: int = 8, rounds: int = 3) -> dict:
    """Where decoding time goes, timed inside real decoding steps (so each layer's weights come
    from memory as they do in decoding, not warm from the previous repeat): the full path and
    skip 0.5 of the deepest layers at batch 1, the full path and "mixed" skip 0.5 at `batch`.
    For each, the step (ms, the best of `rounds` runs of `steps` steps) and per layer kind the
    µs of the router, adapters, K/V fill, the layer itself (its attention's K/V concatenation,
    `_RowsView.update`, listed apart), the cache growth (`KVCache.append_kv`) and the rest of
    `engine._hard_layer` (decision read on the host, gather/scatter at batch > 1). Also the
    cache growth by torch.cat against writing into a preallocated buffer, at the final length."""
    bb = model.backbone
    layers = bb.num_layers
    folded = model.shortcuts.folded(bb)
    prompt_ids = model.tokenizer.encode(prompt)
    out = {"steps": steps, "rounds": rounds, "layers": layers}
    for b, pattern in ((1, "deep"), (batch, "mixed")):
        start = Start.of(model, prompt_ids, b)
        feed = torch.full((b, steps), prompt_ids[-1], device=start.ids.device)
        mask = skip_mask(pattern, 0.5, b, layers)
        for name, route in ((f"b{b}_full", FULL), (f"b{b}_{pattern}_0.5", Route("hard", 0.5, kv_policy, skip=mask))):
            decode(model, start, feed, route, folded)  # warm-up
            best = None
            for _ in range(rounds):
                with _Probe(bb) as probe:
                    seconds = decode(model, start, feed, route, folded)
                if best is None or seconds < best[0]:
                    best = (seconds, probe.totals)
            seconds, totals = best
            kinds = _per_layer(totals, steps, layers)
            in_layers = sum(k["total"] * k["per_step"] for k in kinds.values()) / 1000
            out[name] = {"step_ms": 1000 * seconds / steps, "layers_ms": in_layers,
                         "outside_layers_ms": 1000 * seconds / steps - in_layers, **kinds}
        cache = start.cache
        keys = cache.keys[layers // 2]
        k = keys[:, :, -1:].clone()
        buffer = keys.new_zeros(keys.shape[0], keys.shape[1], keys.shape[2] + 1, keys.shape[3])
        out[f"b{b}_append"] = _median_us({
            "cat": partial(_append_cat, keys, k),
            "preallocated": partial(_append_in_place, buffer, k),
        }, 50)
        out[f"b{b}_append"]["cache_length"] = keys.shape[2]
    return out


def _append_cat(past: torch.Tensor, new: torch.Tensor) -> None:
    """What KVCache.append_kv does to one layer: K and V each grown by torch.cat."""
    torch.cat([past, new], 2)
    torch.cat([past, new], 2)


def _append_in_place(buffer: torch.Tensor, new: torch.Tensor) -> None:
    """The alternative: K and V each written into a preallocated buffer."""
    buffer[:, :, -1:].copy_(new)
    buffer[:, :, -1:].copy_(new)


def _median_us(parts: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median microseconds of each call, the calls timed in turn within each repeat."""
    return {name: 1e6 * statistics.median(t) for name, t in time_in_turn(parts, repeats).items()}


# -- results ------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_rows(rows: list[dict]) -> str:
    lines = ["| batch | pattern | skip | latency (ms/step) | full path (ms/step) | speedup | ideal (FLOPs) | efficiency | ideal, layers only | efficiency, layers only |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['pattern']} | {r['skip_fraction']:.2f} | {r['latency_ms']:.2f} | "
                     f"{r['full_latency_ms']:.2f} | {r['speedup']:.3f}x | {r['ideal_speedup']:.3f}x | "
                     f"{_fmt(r['efficiency'], '.2f')} | {r['ideal_speedup_layers']:.3f}x | "
                     f"{_fmt(r['efficiency_layers'], '.2f')} |")
    return "\n".join(lines)


def markdown_summary(summary: dict) -> str:
    s = summary["settings"]
    md = [f"# speed: {summary['backbone']}", "",
          (f"device: {summary['device']} · {s['layers']} layers, width {s['width']} · {s['steps']} decoding steps after a "
           f"{s['prompt_tokens']}-token prompt · {s['rounds']} rounds, each configuration timed in turn with the full path, "
           f"a step of each at a time, the {s['keep']} round kept · kv_policy {s['kv_policy']} · {s['seconds']:.0f} s"), "",
          markdown_rows(summary["rows"]), "",
          ("Rows of skip 0 (no layer skipped, the routers run) and skip 1 (every layer skipped) are one measurement "
           "shared by the three patterns (`measurement` in summary.json)."), "",
          "| batch | our full path (ms/step) | HF generate (ms/step) | ratio (ours / HF) | our greedy tokens = HF's |",
          "|---|---|---|---|---|"]
    for b, v in summary["hf_generate"].items():
        md.append(f"| {b} | {v['full_step_ms']:.2f} | {v['hf_step_ms']:.2f} | {v['ratio']:.3f} | "
                  f"{summary['full_path_agrees_with_hf'][b]:.0%} |")
    if summary.get("full_vs_full"):
        md += ["", ("The full path timed against itself, the same way (what the estimator reads where nothing "
                    "differs: its bias, and the spread of one round):"), "",
               "| batch | full / full, paired median | quartiles of a round |", "|---|---|---|"]
        md += [f"| {b} | {v['ratio']:.3f} | {v['quartiles'][0]:.3f}-{v['quartiles'][1]:.3f} |"
               for b, v in summary["full_vs_full"].items()]
    md += ["", "| target | figure | bar | met |", "|---|---|---|---|"]
    md += [f"| {t['target']} | {t['figure']:.3f} | {t['bar']} | {'yes' if t['met'] else 'no'} |" for t in summary["targets"]]
    if summary.get("profile"):
        md += ["", markdown_profile(summary["profile"])]
    if summary.get("profile_note"):
        md += ["", summary["profile_note"]]
    md += ["", summary["flops_note"], "", f"Regenerate: `{summary['command']}`", ""]
    return "\n".join(md)


def markdown_profile(profile: dict) -> str:
    """The in-context profile (`profile_step`) as a table: µs per layer of each kind."""
    md = [(f"Where the time goes, timed inside decoding steps (best of {profile['rounds']} runs of {profile['steps']} "
           "steps; µs per layer; `layer` includes its attention's K/V concatenation; `rest`: the decision read, "
           "gather/scatter and bookkeeping of a routed layer):"), "",
          "| run | layer kind | per step | router | adapters | K/V fill | layer | of which K/V cat | append_kv | rest | total |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    steps = []
    for name, run in profile.items():
        if not isinstance(run, dict) or "step_ms" not in run:
            continue
        steps.append(f"{name}: {run['step_ms']:.2f} ms per step, {run['layers_ms']:.2f} in the layers, "
                     f"{run['outside_layers_ms']:.2f} outside them (embedding, mask, rotary, final norm, head, choice)")
        for kind, parts in run.items():
            if isinstance(parts, dict):
                cells = [_fmt(parts.get(key), ".0f") for key in ("router", "adapters", "kv_fill", "layer", "attention_kv_cat",
                                                                "append_kv", "rest", "total")]
                md.append(f"| {name} | {kind} | {parts['per_step']:.1f} | " + " | ".join(cells) + " |")
    md += [""] + [f"- {line}" for line in steps]
    for name, parts in profile.items():
        if name.endswith("_append"):
            md.append(f"- {name[:-7]}: growing one layer's K and V by torch.cat {parts['cat']:.0f} µs, writing them into a "
                      f"preallocated buffer {parts['preallocated']:.0f} µs (cache length {parts['cache_length']})")
    return "\n".join(md)


def plot_speedups(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    rows = [r for r in summary["rows"] if r["pattern"] in PATTERNS]
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        mine = [r for r in rows if r["batch_size"] == b]
        ideal = sorted({(r["skip_fraction"], r["ideal_speedup"]) for r in mine if r["pattern"] == mine[0]["pattern"]})
        ax.plot(*zip(*ideal), "k--", label="ideal (FLOPs of the step)")
        layers = sorted({(r["skip_fraction"], r["ideal_speedup_layers"]) for r in mine if r["pattern"] == mine[0]["pattern"]})
        ax.plot(*zip(*layers), "k:", label="ideal, layers only (LM head left out)")
        for pattern in PATTERNS:
            points = sorted((r["skip_fraction"], r["speedup"]) for r in mine if r["pattern"] == pattern)
            if points:
                ax.plot(*zip(*points), "o-", label=pattern)
        for r in summary["rows"]:
            if r["pattern"] == "learned" and r["batch_size"] == b:
                ax.plot([r["skip_fraction"]], [r["speedup"]], "r*", markersize=12, label="learned")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13]))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"batch {b}")
        ax.set_xlabel("skip fraction")
    axes[0][0].set_ylabel("speedup over the full path")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{summary['backbone']} · {summary['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(summary: dict, out: Path) -> Path:
    from .checkpoint import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", markdown_summary(summary))
    plot_speedups(summary, out / "speedup.png")
    return out / "summary.json"
