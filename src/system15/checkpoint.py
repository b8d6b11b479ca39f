"""Crash-safe checkpoints: written to a temporary folder, sealed with a manifest of sizes and
SHA-256 sums, then renamed into place. Loading verifies the manifest first; a truncated or
corrupted checkpoint is refused, and resume falls back to the previous good one.

Everything is safetensors or JSON: optimizer state is flattened into tensors, so nothing is
ever unpickled.

One writer per run folder: while a run trains, `<run_dir>/.lock` names its process (RunLock).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
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


# -- one writer per run folder ---------------------------------------------------------

LOCK = ".lock"  # in a run folder while a process trains into it: that process's pid and host
LOCK_GRACE = 2.0  # seconds a lock may stay empty (its holder writes it right after creating it)


class RunLockedError(RuntimeError):
    """Another process, alive or on another host, trains into the same run folder."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), which tells it from a later process that
    got the same pid; None where there is no /proc."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    """Does the process that wrote a lock on this host still run?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return started is None or fields is None or _start_ticks(pid) == started


class RunLock:
    """`<run_dir>/.lock`: the one process allowed to write into a run folder.

    Taken with O_CREAT|O_EXCL, so of two processes racing for it exactly one gets it. A lock
    whose holder no longer runs on this host (killed) is taken over; one written on another
    host is never judged from here. Use as `with RunLock(run_dir):` or acquire()/release()."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.text: str | None = None  # what this process wrote, while it holds the lock

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        self.text = json.dumps({"pid": me, "host": socket.gethostname(), "started": _start_ticks(me),
                                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex})
        deadline = time.monotonic() + 10 * LOCK_GRACE
        while time.monotonic() < deadline:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as f:  # one small write: readers see all of it or an empty file
                f.write(self.text)
                f.flush()
                os.fsync(f.fileno())
            return self
        self.text = None
        raise RunLockedError(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _refuse_or_clear(self) -> None:
        """The lock exists: raise if its holder may still run, else remove it."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            return
        try:
            holder = json.loads(text)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (ValueError, KeyError, TypeError):
            if age < LOCK_GRACE:  # its holder is about to write it
                time.sleep(0.05)
                return
            holder, pid, host = None, None, None  # its holder died between creating and writing it
        if holder is not None:
            if host != socket.gethostname():
                raise RunLockedError(f"{self.path.parent} is locked by pid {pid} on host {host} (since "
                                     f"{holder.get('since')}); this host cannot tell whether it still runs: once "
                                     f"it is gone, delete {self.path}")
            if _alive(pid, holder.get("started")):
                raise RunLockedError(f"{self.path.parent} is locked by pid {pid} on {host} (since "
                                     f"{holder.get('since')}): another process trains into this run folder; "
                                     f"wait for it to end or stop it")
        if self._take_over(text):
            warnings.warn(f"{self.path}: took over the lock of pid {pid}, which no longer runs", stacklevel=3)

    def _take_over(self, stale: str) -> bool:
        """Remove the lock judged stale, and only that one: a racer may have replaced it since.
        Returns whether this process removed it."""
        aside = _aside(self.path, "stale")
        try:
            self.path.rename(aside)  # of several racers, one moves it
        except FileNotFoundError:
            return False
        try:
            if aside.read_text() == stale:
                return True
            try:  # a fresh lock, taken after another racer cleared the stale one: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's; a second call does nothing."""
        if self.text is None:
            return
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.text = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
