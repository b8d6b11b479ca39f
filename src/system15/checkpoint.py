"""Crash-safe checkpoints: written to a temporary folder, sealed with a manifest of sizes and
SHA-256 sums, then renamed into place. Loading verifies the manifest first; a truncated or
corrupted checkpoint is refused, and resume falls back to the previous good one.

Everything is safetensors or JSON: optimizer state is flattened into tensors, so nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _aside(target: Path, kind: str) -> Path:
    """A hidden sibling of `target` for a write in progress ("tmp") or a copy being replaced
    ("old"); `recover` finds a checkpoint folder's leftovers by these names."""
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Replace one file's contents all at once: a reader (or a run killed mid-write) sees the
    old file or the new one, never a torn one. The folder-level counterpart is write_atomic."""
    target = Path(target)
    tmp = _aside(target, "tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_atomic(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let `fill(tmp_dir)` write the files, seal them with a manifest, then rename into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(target, "tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = _aside(target, "old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def verify(directory: str | os.PathLike) -> None:
    """Raise CheckpointError unless every file in the manifest is present and intact."""
    d = Path(directory)
    manifest_path = d / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{d}: no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, meta in manifest.items():
        p = d / name
        if not p.exists():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{p}: size {p.stat().st_size} != {meta['size']} in {MANIFEST} (truncated?)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: checksum mismatch (corrupted)")


# -- optimizer state as tensors ---------------------------------------------------------

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})


AVERAGE = "average.safetensors"  # a training checkpoint's weight average (train.ema), when the run keeps one


def save_training_state(directory: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict,
                        average: dict[str, torch.Tensor] | None = None) -> Path:
    """Model weights, optimizer state, RNG, loop counters and (when given) the weight average
    in one sealed folder."""
    from safetensors.torch import save_model

    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = optimizer_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=1))
        if average is not None:
            save_file(average, str(tmp / AVERAGE))

    return write_atomic(directory, fill)


def load_training_state(directory: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_model

    d = Path(directory)
    verify(d)
    load_model(model, str(d / "model.safetensors"))
    state = json.loads((d / "state.json").read_text())
    load_optimizer(opt, load_file(str(d / "optimizer.safetensors")), state.pop("optimizer"))
    torch.set_rng_state(load_file(str(d / "rng.safetensors"))["torch"])
    return state


def load_average(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weight average a training checkpoint keeps (already verified by load_training_state)."""
    path = Path(directory) / AVERAGE
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the run averages its weights (train.ema) but this checkpoint has no average")
    return load_file(str(path))


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints under run_dir/checkpoints, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.exists() else []


def latest_good(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and passed over."""
    for ckpt in checkpoints(run_dir):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            warnings.warn(f"skipping bad checkpoint: {e}", stacklevel=2)
    return None


def recover(target: str | os.PathLike) -> None:
    """Undo what a crash inside `write_atomic` left next to `target`: unfinished temporary
    folders are deleted, and if the crash fell between moving the old version aside and
    moving the new one in, the old version is put back."""
    target = Path(target)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not target.exists():
            try:
                verify(old)
                old.rename(target)
                continue
            except CheckpointError:
                pass
        shutil.rmtree(old, ignore_errors=True)


def prune(run_dir: str | os.PathLike, keep: int = 2) -> None:
    """Keep the newest `keep` checkpoints (older ones are the fallback if the newest is bad),
    and delete temporary folders that a killed run left unfinished."""
    for old in checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for tmp in root.glob(".step-*.tmp-*") if root.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)
