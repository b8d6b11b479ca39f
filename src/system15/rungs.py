"""Run folders of the ladder: which rung starts from which, what each one's training
depends on, and a refusal to reuse a finished (or resumable) run trained on something else.

A rung's training depends on
- the task and the backbone (every key but `task.n_test`, which only the test set reads);
- its own `stages.<method>` entry;
- the keys its objective lists in `Objective.settings` (pause reads `latent.pause_K`, ...);
- the weights of the rung it starts from (`INIT_FROM`), recorded by their SHA-256.

`run.json` records the whole config, so the first three are read back from it. One key
is forgiven: a wall-clock cap (`max_minutes`) that did not bind. A finished run that made
every step of its schedule inside the new cap is the run that cap would give. Without this
check, a run folder left by an earlier config would be reused silently, and the results
table would mix runs trained on different settings.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from .checkpoint import MANIFEST
from .config import RunConfig, TrainConfig, merge
from .model import WEIGHTS_FILE
from .train import objective_class

INIT_FROM = {"cot": None, "nocot": None, "pause": "cot", "coconut": "cot", "latent": "cot", "system15": "latent"}
TEST_RECORDS = "test_records.json"  # a finished rung's test-set records, kept by pipeline.evaluate_rung
# The source that turns weights into test records: decoding, the layers, the shortcuts, the
# tokenizer, the layout of a prompt, and how an answer is read and scored.
DECODING_SOURCES = ("engine.py", "backbone.py", "shortcuts.py", "model.py", "tokenizer.py", "layout.py", "inference.py",
                    "evaluate.py", "flops.py", "data/formats.py", "data/records.py")


@cache
def decoding_digest() -> str:
    """SHA-256 over DECODING_SOURCES and the torch and transformers versions, so that test
    records decoded by other code (an engine change, a library upgrade) are decoded again
    instead of reused."""
    import torch
    import transformers

    package = Path(__file__).parent
    h = hashlib.sha256(f"torch {torch.__version__}\0transformers {transformers.__version__}\0".encode())
    for name in DECODING_SOURCES:
        h.update(name.encode() + b"\0" + (package / name).read_bytes())
    return h.hexdigest()


class StaleRunError(RuntimeError):
    """A run folder holds a run trained with other settings than the ones asked for."""


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _lookup(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


# settings that are not part of any one run: the test set's size, and how the ladder chooses
# between stage-2 runs (each grid run is the run its own mu would give)
OUTSIDE_A_RUN = ("task.n_test", "shortcut.mu_grid", "shortcut.mu_tolerance")


def rung_settings(method: str, config: dict, train: dict) -> dict:
    """Every setting the training of `method` depends on, as {dotted key: value}.
    config: a RunConfig as a dict; train: its TrainConfig for `method` as a dict."""
    keys = ("task", "backbone", *objective_class(method).settings)
    out = {}
    for key in keys:
        out.update(_flatten(_lookup(config, key), key))
    for key in OUTSIDE_A_RUN:
        out.pop(key, None)
    out.update(_flatten(train, f"stages.{method}"))
    return out


def _cap_did_not_bind(run_dir: Path, steps: int, cap: float | None) -> bool:
    """A finished run that made every step of its schedule in less time than `cap` minutes
    is the run that cap would have given too: the wall-clock cap changed nothing."""
    try:
        done = json.loads((run_dir / "done.json").read_text())
        finished, seconds = done["steps"] == steps, float(done["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return finished and (cap is None or seconds < 60 * cap)


def weights_digest(model_dir: str | Path) -> str | None:
    """The SHA-256 of a saved model's weights, from its checkpoint manifest."""
    manifest = Path(model_dir) / MANIFEST
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get(WEIGHTS_FILE, {}).get("sha256")


def provenance(method: str, runs_dir: Path) -> dict:
    """What run.json records about where a new run starts: the parent rung and its weights."""
    parent = INIT_FROM[method]
    if parent is None:
        return {"init_from": None}
    return {"init_from": {"run": parent, "weights_sha256": weights_digest(runs_dir / parent / "best")}}


def check_reusable(run_dir: Path, method: str, config: dict, train: dict, runs_dir: Path) -> None:
    """Raise StaleRunError, naming every differing key, if the run recorded in
    `run_dir/run.json` was trained on other settings, or from other parent weights, than
    a run started now would be. Runs recorded before parents were fingerprinted skip the
    parent check."""
    record_path = run_dir / "run.json"
    try:
        record = json.loads(record_path.read_text())
        # on top of today's defaults: a key added since the run was recorded takes its
        # default, which is what the code did before the key existed
        recorded = rung_settings(method, merge(RunConfig().to_dict(), record["config"]),
                                 merge(vars(TrainConfig()), record["train"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StaleRunError(f"{record_path}: cannot read the settings this run was trained with ({e!r}); "
                            f"move or delete {run_dir} to retrain it") from None
    wanted = rung_settings(method, config, train)
    differ = {k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)}
    cap = f"stages.{method}.max_minutes"
    if cap in differ and _cap_did_not_bind(run_dir, recorded[f"stages.{method}.steps"], wanted[cap]):
        differ.discard(cap)
    diffs = [f"{k}: trained with {recorded.get(k, '<unset>')!r}, asked for {wanted.get(k, '<unset>')!r}"
             for k in sorted(differ)]
    init = record.get("init_from")
    if init:
        now = weights_digest(runs_dir / init["run"] / "best")
        if now != init.get("weights_sha256"):
            diffs.append(f"started from {runs_dir / init['run'] / 'best'} with weights {str(init.get('weights_sha256'))[:12]}, "
                         f"which now holds {str(now)[:12]} (the parent was retrained)")
    if diffs:
        raise StaleRunError(f"{run_dir} holds a {method} run trained on other settings than asked for:\n  "
                            + "\n  ".join(diffs)
                            + f"\nMove or delete {run_dir} to retrain it, or give the new settings their own run "
                              "(an ablation variant, or another `name`).")
