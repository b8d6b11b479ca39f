"""The reasoning model (model.py): its spec, what a thought step reads, and the model folder:
saved and loaded back, it answers as it did; an incomplete or damaged one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from system15.checkpoint import CheckpointError, verify, write_atomic
from system15.model import ModelSpec, ReasoningModel, load_reasoning_model
from tests.helpers import copy_of, flip_byte, randomise_routers, tiny_model, truncate
from tests.helpers.tiny_run import tiny_config


def answers(model, questions):
    return [(a.text, a.thought_steps, a.decoding_steps, a.flops, [(r.kind, r.token, r.ran) for r in a.routes])
            for a in model.answer(questions, max_new_tokens=5)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_saved_folder_answers_as_the_model_did(examples, tmp_path, family):
    """A System-1.5 model whose routers skip some layers: after save and load, the same spec,
    tokenizer and weights, and the same answers, thought steps, FLOPs and routes."""
    model = randomise_routers(tiny_model(examples, family, shortcuts=True), seed=4)
    model.method, model.spec.K, model.spec.lambda_depth = "system15", 2, 0.6
    before = answers(model, examples[:3])
    assert any(not ran for *_, routes in before for _, _, ran_list in routes for ran in ran_list), \
        "the case should skip some layers"
    model.save(tmp_path / "model")
    loaded = load_reasoning_model(tmp_path / "model")
    assert loaded.spec == model.spec and loaded.backbone.family == family
    assert loaded.tokenizer.tokens == model.tokenizer.tokens
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert answers(loaded, examples[:3]) == before


def test_a_folder_holds_the_spec_the_backbone_config_and_the_tokenizer(examples, tmp_path):
    model = tiny_model(examples)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "backbone_config.json", "char_tokenizer.json", "model.safetensors", "system15.json"]
    spec = json.loads((tmp_path / "m" / "system15.json").read_text())
    assert spec["format"] == 1 and spec["family"] == "gpt2" and spec["shortcuts"] is False
    assert spec["thought"] == "latent"


def test_a_folder_from_another_format_or_nowhere_is_refused(examples, tmp_path):
    model = tiny_model(examples)
    model.save(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "system15.json").read_text())
    (tmp_path / "m" / "system15.json").write_text(json.dumps({**spec, "format": 2}))
    with pytest.raises(ValueError, match="format: this system15 reads format 1, the folder has 2"):
        load_reasoning_model(tmp_path / "m")
    (tmp_path / "m" / "system15.json").write_text(json.dumps({**spec, "colour": "red"}))
    with pytest.raises(ValueError, match=r"system15.json: colour: unknown field"):
        load_reasoning_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_reasoning_model(tmp_path / "nowhere")


def test_a_spec_names_its_first_impossible_field():
    assert ModelSpec().problems() == []
    with pytest.raises(ValueError, match="spec.json: kv_policy: must be fill or skip, got 'drop'"):
        ModelSpec.from_dict({"kv_policy": "drop"}, "spec.json")
    assert ModelSpec(thought="dream").problems() == ["thought: must be one of (None, 'latent', 'hidden', 'pause'), "
                                                     "got 'dream'"]
    assert ModelSpec(K=-1, adapter_dim=0).problems() == ["K: must be an integer >= 0 or null, got -1",
                                                         "adapter_dim: must be a positive integer, got 0"]


def test_a_model_is_not_built_on_an_impossible_spec(examples):
    model = tiny_model(examples)
    with pytest.raises(ValueError, match="lambda_depth: must lie in"):
        ReasoningModel(model.backbone, model.tokenizer, ModelSpec(lambda_depth=2.0))


def test_what_a_thought_step_reads(examples):
    model = tiny_model(examples)
    h = torch.randn(3, model.backbone.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.thought_input(0, h), model.projection(h))  # latent: P(h_L)
        model.thought = "hidden"
        assert torch.equal(model.thought_input(0, h), h)  # Coconut: h_L itself
        model.thought = "pause"
        n = model.pause.shape[0]
        for k in range(2 * n):  # pause: the learned embeddings in turn, the same for every row
            assert torch.equal(model.thought_input(k, h), model.pause[k % n].expand_as(h))
    model.thought = None
    with pytest.raises(ValueError, match="no thought steps"):
        model.thought_input(0, h)


def test_shortcuts_take_their_shapes_from_the_spec(examples):
    model = tiny_model(examples)
    assert model.shortcuts is None
    model.add_shortcuts()
    layer = model.shortcuts[0]
    assert len(model.shortcuts.layers) == model.num_layers
    assert layer.read_in.out_features == model.spec.router_hidden + model.spec.adapter_dim
    assert layer.read_prev.out_features == model.spec.adapter_dim


# -- sealed model folders: reshaped by a rung, incomplete, damaged, or of an earlier layout -----

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
