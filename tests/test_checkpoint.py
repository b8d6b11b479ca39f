"""Sealed checkpoints: atomic writes, a size + SHA-256 manifest verified on load, fallback to
the previous good checkpoint, and refusal of damaged model folders."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch

from system15.checkpoint import (MANIFEST, CheckpointError, checkpoints, latest_good, load_training_state, prune,
                                 recover, save_training_state, verify, write_atomic, write_text_atomic)
from system15.model import load_reasoning_model

from tiny_run import tiny_config, tiny_setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of the data (past a safetensors header), size unchanged."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] if path.suffix == ".safetensors" else 0
    data[(start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, objective, encoded, _ = tiny_setup(tiny_config(steps=3, batch=4))
    objective.prepare(model)
    return model, objective, encoded


def trained_optimizer(model, objective, encoded, steps: int = 2) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(steps):
        loss, _ = objective.loss(model, objective.collate(model, encoded[4 * i:4 * i + 4]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.fixture(scope="module")
def state_dir(tiny, tmp_path_factory):
    model, objective, encoded = tiny
    opt = trained_optimizer(model, objective, encoded)
    return save_training_state(tmp_path_factory.mktemp("ckpt") / "step-0000002", model, opt, {"step": 2, "best": 0.5})


def copy_of(directory: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(directory, tmp_path / directory.name))


# -- write_atomic / verify ------------------------------------------------------------------

def test_write_atomic_seals_every_file(tmp_path):
    target = write_atomic(tmp_path / "out", lambda d: ((d / "a.txt").write_text("x"), (d / "sub").mkdir(),
                                                       (d / "sub" / "b.bin").write_bytes(b"\0" * 10)))
    manifest = json.loads((target / MANIFEST).read_text())
    assert set(manifest) == {"a.txt", "sub/b.bin"} and manifest["sub/b.bin"]["size"] == 10
    assert len(manifest["a.txt"]["sha256"]) == 64
    verify(target)


def test_failed_write_leaves_no_target_and_no_temp(tmp_path):
    def fill(d: Path):
        (d / "half.bin").write_bytes(b"123")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_an_existing_target(tmp_path):
    write_atomic(tmp_path / "out", lambda d: (d / "v").write_text("1"))
    write_atomic(tmp_path / "out", lambda d: (d / "v").write_text("2"))
    assert (tmp_path / "out" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
    verify(tmp_path / "out")


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "done.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["done.json"]

    import os

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # the write dies after part of the text went out
    with pytest.raises(OSError):
        write_text_atomic(target, "newer")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["done.json"]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_truncated_file_is_refused_naming_it(state_dir, tmp_path, name):
    d = copy_of(state_dir, tmp_path)
    truncate(d / name)
    with pytest.raises(CheckpointError, match="truncated") as err:
        verify(d)
    assert str(d / name) in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_flipped_byte_is_refused_naming_it(state_dir, tmp_path, name):
    d = copy_of(state_dir, tmp_path)
    flip_byte(d / name)
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        verify(d)
    assert str(d / name) in str(err.value)


def test_missing_file_and_missing_or_garbled_manifest(state_dir, tmp_path):
    d = copy_of(state_dir, tmp_path)
    (d / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: missing"):
        verify(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify(d)


def test_checkpoint_holds_only_safetensors_and_json(state_dir):
    assert {p.suffix for p in state_dir.iterdir()} == {".safetensors", ".json"}


# -- training state ---------------------------------------------------------------------------

def test_training_state_round_trip(tiny, tmp_path):
    model, objective, encoded = tiny
    opt = trained_optimizer(model, objective, encoded)
    torch.manual_seed(123)
    d = save_training_state(tmp_path / "step-0000002", model, opt, {"step": 2, "best": 0.25, "best_step": 2})
    expected_draw = torch.rand(5)

    fresh, fresh_objective, _, _ = tiny_setup(tiny_config(steps=3, batch=4, seed=1))
    fresh_objective.prepare(fresh)
    for p in fresh.parameters():
        p.data.add_(1.0)  # make sure the load really overwrites
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    state = load_training_state(d, fresh, fresh_opt)

    assert state == {"step": 2, "best": 0.25, "best_step": 2}
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for idx, slots in saved["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, loaded["state"][idx][key]), (idx, key)
    assert [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]] == \
           [{k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"} for g in loaded["param_groups"]]
    assert torch.equal(torch.rand(5), expected_draw), "RNG state not restored"


def test_corrupt_state_is_refused_before_the_model_is_touched(tiny, state_dir, tmp_path):
    model, _, _ = tiny
    d = copy_of(state_dir, tmp_path)
    flip_byte(d / "optimizer.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_training_state(d, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latest_good_falls_back_past_damaged_checkpoints(state_dir, tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        copy_of(state_dir, run / "checkpoints").rename(run / "checkpoints" / f"step-{step:07d}")
    flip_byte(run / "checkpoints" / "step-0000030" / "model.safetensors")
    truncate(run / "checkpoints" / "step-0000020" / "state.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_good(run) == run / "checkpoints" / "step-0000010"
    messages = [str(w.message) for w in caught]
    assert any("step-0000030" in m and "checksum mismatch" in m for m in messages)
    assert any("step-0000020" in m and "truncated" in m for m in messages)


def test_latest_good_is_none_without_a_good_checkpoint(state_dir, tmp_path):
    assert latest_good(tmp_path) is None
    copy_of(state_dir, tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / state_dir.name / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        assert latest_good(tmp_path) is None


def test_prune_keeps_the_newest_two_and_clears_unfinished_temp_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step-{step:07d}").mkdir(parents=True)
    (root / ".step-0000005.tmp-deadbeef").mkdir()  # what a kill during write_atomic leaves
    prune(tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000004", "step-0000003"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000004"]


def test_recover_puts_back_the_old_version_after_a_crash_between_renames(tmp_path):
    best = write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v1"))
    best.rename(tmp_path / ".best.old-12345678")  # crashed after moving the old one aside
    (tmp_path / ".best.tmp-87654321").mkdir()  # ... with the new one unfinished
    recover(tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_recover_drops_the_old_version_when_the_new_one_is_in_place(tmp_path):
    write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v1")).rename(tmp_path / ".best.old-1")
    write_atomic(tmp_path / "best", lambda d: (d / "w").write_text("v2"))
    recover(tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["best"]


# -- model folders (load_reasoning_model) -----------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, _, _ = tiny
    return write_atomic(tmp_path_factory.mktemp("model") / "best", model.save)


def test_saved_model_loads_back(tiny, model_dir):
    loaded = load_reasoning_model(model_dir)
    for (name, a), (_, b) in zip(tiny[0].state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_rung_may_reshape_only_what_its_parent_never_trained(tiny, model_dir, tmp_path):
    """A stage-1 variant with a wider P starts from the CoT model, whose P was never trained;
    a model that did train its P refuses the change instead of silently dropping it."""
    import dataclasses
    import shutil

    from system15.config import ConfigError

    base = tiny_config(steps=3, batch=4)
    wider = dataclasses.replace(base, architecture=dataclasses.replace(base.architecture, projection_hidden=48),
                                baselines=dataclasses.replace(base.baselines, pause_K=3))
    assert tiny[0].method == "cot"
    loaded = load_reasoning_model(model_dir, wider)
    assert loaded.projection.net[0].weight.shape == (48, 32) and loaded.pause.shape == (3, 32)
    assert (loaded.spec.projection_hidden, loaded.spec.pause_K) == (48, 3)
    assert torch.equal(loaded.backbone.embed(torch.arange(5)), tiny[0].backbone.embed(torch.arange(5)))
    latent = Path(shutil.copytree(model_dir, tmp_path / "latent"))
    meta = json.loads((latent / "system15.json").read_text())
    (latent / "system15.json").write_text(json.dumps({**meta, "method": "latent"}))
    (latent / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="architecture.projection_hidden"):
        load_reasoning_model(latent, wider)


def test_model_folder_without_weights_is_refused(model_dir, tmp_path):
    d = copy_of(model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_reasoning_model(d)


@pytest.mark.parametrize("damage", ["truncate", "header"])
@pytest.mark.parametrize("sealed", [True, False], ids=["with-manifest", "without-manifest"])
def test_model_folder_with_damaged_weights_is_refused(model_dir, tmp_path, damage, sealed):
    """Sealed folders are refused by the manifest; unsealed ones by safetensors itself."""
    d = copy_of(model_dir, tmp_path)
    if not sealed:
        (d / "manifest.json").unlink()
    weights = d / "model.safetensors"
    if damage == "truncate":
        truncate(weights)
    else:
        data = bytearray(weights.read_bytes())
        data[8:12] = b"\xff\xfe{]"
        weights.write_bytes(bytes(data))
    expected = (CheckpointError, "size|checksum") if sealed else (ValueError, "cannot load weights")
    with pytest.raises(expected[0], match=expected[1]) as err:
        load_reasoning_model(d)
    assert str(weights) in str(err.value)


def test_flipped_weight_byte_is_caught_by_the_folder_manifest(model_dir, tmp_path):
    d = copy_of(model_dir, tmp_path)
    flip_byte(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        verify(d)


def test_load_reasoning_model_refuses_a_flipped_weight_byte(model_dir, tmp_path):
    """safetensors has no checksum; the folder's manifest catches a flipped bit in the weights."""
    d = copy_of(model_dir, tmp_path)
    flip_byte(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_reasoning_model(d)


def test_a_folder_written_before_system15_json_still_loads_without_its_training_paths(tiny, model_dir, tmp_path):
    """The earlier layout (model.json beside the whole run config.json) loads from the folder
    alone, even though its run config names a backbone folder that no longer exists."""
    import shutil

    old = Path(shutil.copytree(model_dir, tmp_path / "old"))
    spec = json.loads((old / "system15.json").read_text())
    (old / "system15.json").unlink()
    (old / "manifest.json").unlink()
    (old / "model.json").write_text(json.dumps({"method": "latent", "thought": "latent", "shortcuts": False,
                                                "family": "gpt2"}))
    run = tiny_config(steps=3, batch=4).to_dict()
    run["backbone"].update(source="hf", path=str(tmp_path / "gone"))
    arch = run.pop("architecture")  # the layout of its day: latent.* and shortcut.*
    run["latent"] = {"K": 3, "projection_hidden": arch["projection_hidden"]}
    run["shortcut"] = {k: arch[k] for k in ("adapter_dim", "router_hidden", "lambda_depth", "kv_policy")}
    (old / "config.json").write_text(json.dumps(run))
    loaded = load_reasoning_model(old)
    assert (loaded.method, loaded.thought, loaded.spec.K) == ("latent", "latent", 3)
    assert loaded.spec.projection_hidden == spec["projection_hidden"] and loaded.spec.max_new_tokens == spec["max_new_tokens"]
    for (name, a), (_, b) in zip(tiny[0].state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    loaded.save(tmp_path / "new")  # saved again: the current layout
    assert (tmp_path / "new" / "system15.json").exists() and not (tmp_path / "new" / "config.json").exists()
