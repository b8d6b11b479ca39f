"""Where the routers' time goes on the speed benchmark's backbone (docs/speed.md, "Why the
routers cost 5%"): the measurements behind that section, written to one JSON file.

    python recipes/speed_probes/routers.py --out results/speed/routers.json

Four probes, on configs/speed.yaml's model (SmolLM2-135M, shortcuts of 64), on an idle machine:

- `profile`: torch.profiler over 3 x 8 decoding steps at batch 8, skip 0 (every router runs,
  none skips) against the full path: the self time a step of each aten operation, and the
  operations whose time differs most;
- `product`: a [width, router + adapter units] product as the decision runs it, on one matrix
  kept warm and cycled over 300 distinct matrices (none in cache, as in decoding);
- `size`: skip 0 against the full path, paired steps (speed._in_turn), with the recipe's
  routers and adapters (64) and with 8: whether the cost follows their size;
- `compile`: the decision (FoldedShortcut.decide) eager and under torch.compile.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from system15.config import load_config
from system15.engine import FULL, Route
from system15.model import build_model
from system15.speed import (
    DEFAULT_PROMPT,
    Config,
    Stepper,
    _in_turn,
    _measure,
    _median_us,
    _paired,
    _quartiles,
    _reference,
    decode,
    skip_mask,
)

RECIPE = "configs/speed.yaml"
STEPS = 8
REPEATS = 3000  # timed calls of each small operation (speed._median_us: the calls in turn)


def _model(overrides=()):
    model = build_model(load_config(RECIPE, list(overrides)), texts=[DEFAULT_PROMPT])
    model.add_shortcuts()
    return model.eval()


def _skip0(model, batch):
    return Route("hard", 0.5, "fill", skip=skip_mask("deep", 0.0, batch, model.num_layers))


def probe_profile(batch: int = 8, repeats: int = 3) -> dict:
    model = _model()
    folded = model.shortcuts.folded(model.backbone)
    with torch.inference_mode():
        return _profile(model, folded, batch, repeats)


def _profile(model, folded, batch, repeats):
    start, _, feed = _reference(model, DEFAULT_PROMPT, batch, STEPS)
    routes = {"full": FULL, "skip0": _skip0(model, batch)}
    ms = {name: {} for name in routes}
    for route in routes.values():
        decode(model, start, feed, route, folded)  # warm-up
    for _ in range(repeats):
        for name, route in routes.items():
            with profile(activities=[ProfilerActivity.CPU]) as p:
                decode(model, start, feed, route, folded)
            for e in p.key_averages():
                if e.key.startswith("aten::"):
                    ms[name][e.key] = ms[name].get(e.key, 0.0) + e.self_cpu_time_total / 1000 / repeats / STEPS
    ops = set(ms["full"]) | set(ms["skip0"])
    added = {op: ms["skip0"].get(op, 0.0) - ms["full"].get(op, 0.0) for op in ops}
    top = sorted(added.items(), key=lambda kv: -abs(kv[1]))[:12]
    return {"batch": batch, "steps": STEPS, "repeats": repeats,
            "self_ms_per_step": {name: sum(v.values()) for name, v in ms.items()},
            "added_ms_per_step": dict(top)}


def probe_product(distinct: int = 300) -> dict:
    fold = _model().shortcuts.folded()[0]
    width, units = fold.read.shape
    out = {"shape": [width, units], "distinct_matrices": distinct}
    matrices = [torch.randn(width, units) for _ in range(distinct)]
    for batch in (1, 8):
        out[f"b{batch}"] = _product_us(fold, matrices, torch.randn(batch, width))
    return out


def _product_us(fold, matrices, x) -> dict:
    turn = [0]

    def cold():
        turn[0] = (turn[0] + 1) % len(matrices)
        return torch.addmm(fold.read_bias, x, matrices[turn[0]])

    return _median_us({"warm_us": lambda: torch.addmm(fold.read_bias, x, fold.read), "cold_us": cold}, REPEATS)


def probe_size(rounds: int = 15, batch: int = 1) -> dict:
    out = {"batch": batch, "rounds": rounds}
    for label, overrides in (("64", ()), ("8", ("architecture.adapter_dim=8", "architecture.router_hidden=8"))):
        model = _model(overrides)
        folded = model.shortcuts.folded(model.backbone)
        with torch.inference_mode():
            start, _, feed = _reference(model, DEFAULT_PROMPT, batch, STEPS)
            route = _skip0(model, batch)
            decode(model, start, feed, route, folded)
            skip0 = Config("skip0", partial(_in_turn, partial(Stepper, model, start, feed, route, folded),
                                            partial(Stepper, model, start, feed), STEPS))
            _measure([skip0], rounds, f"routers of {label}", quiet=False)
        routed, full = _paired(skip0)
        out[f"routers_{label}"] = {"skip0_speedup": full / routed, "quartiles": _quartiles(skip0)}
    return out


def probe_compile(batch: int = 8) -> dict:
    fold = _model().shortcuts.folded()[0]
    x = torch.randn(batch, fold.read.shape[0])
    compiled = torch.compile(fold.decide, dynamic=False)
    began = time.perf_counter()
    compiled(x)
    first = time.perf_counter() - began
    return {"batch": batch, **_median_us({"eager_us": lambda: fold.decide(x), "compiled_us": lambda: compiled(x)}, REPEATS),
            "first_call_s": first}


PROBES = {"profile": probe_profile, "product": probe_product, "size": probe_size, "compile": probe_compile}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--probes", nargs="+", choices=list(PROBES), default=list(PROBES))
    args = ap.parse_args()
    result = {"recipe": RECIPE, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "command": "python recipes/speed_probes/routers.py --out " + args.out}
    for name in args.probes:  # each builds its model outside inference mode (folding reads version counters)
        print(f"probe {name} ...", flush=True)
        result[name] = PROBES[name]()
        print(json.dumps(result[name], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
