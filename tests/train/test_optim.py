"""train.optimizer: Muon's orthogonalised step on the hidden matrices, AdamW on the rest, one
optimizer the loop schedules, checkpoints and resumes like AdamW."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn

from system15.config import ConfigError, TrainConfig
from system15.train.loop import fit
from system15.train.optim import MuonAdamW, build_optimizer, fused_blocks, hidden_matrices, orthogonalise

from tests.helpers import tiny_config, tiny_model
from tests.helpers.tiny_run import tiny_config as tiny_run_config
from tests.helpers.tiny_run import tiny_setup


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_orthogonalise_keeps_the_directions_and_evens_the_singular_values(shape):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    spread = torch.logspace(0, 1.5, min(shape))  # singular values 1 .. 32
    g = u @ torch.diag(spread) @ v.T
    o = orthogonalise(g)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s
    # the same singular vectors: o is close to u v^T, which g's largest directions alone are not
    target = u @ v.T
    cosine = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))
    assert cosine(o, target) > 0.97
    assert cosine(g, target) < 0.8


def test_its_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    theirs = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    theirs.load_state_dict(ours.state_dict())
    opt_ours = MuonAdamW([{"params": list(ours.parameters()), "muon": False}], lr=0.01, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(6):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(examples, family):
    model = tiny_model(examples, family)
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=4e-3)
    trainable = list(model.parameters())
    opt, scales = build_optimizer(model, [{"params": trainable, "lr_scale": 1.0}], cfg)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    rest = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon and rest and not muon & rest
    assert muon | rest == {n for n, _ in model.named_parameters()}  # every parameter, once
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 2 for n in muon)
    assert {n for n in muon if n.startswith("projection.")} == {"projection.net.0.weight", "projection.net.2.weight"}
    embeddings = {n for n, p in params.items() if p is model.backbone.lm.get_input_embeddings().weight}
    assert embeddings and embeddings <= rest  # the (tied) head too: it is the embedding matrix
    assert id(model.backbone.lm.get_output_embeddings().weight) not in hidden_matrices(model)
    per_layer = 4 if family == "gpt2" else 7  # c_attn c_proj c_fc mlp.c_proj | q k v o gate up down
    assert len(muon) == per_layer * model.num_layers + 2
    assert scales == [4.0 if g["muon"] else 1.0 for g in opt.param_groups]


@pytest.mark.parametrize("blocks", [1, 3])
def test_a_split_matrix_steps_each_block_as_a_matrix_of_its_own(blocks):
    """muon_qkv: split. A d x 3d matrix with "blocks": 3 moves each d x d block by an
    orthogonalised step of its own (all its singular values near one, scaled for a d x d
    matrix); fused, the blocks share one orthogonalisation and none of them is orthogonal."""
    torch.manual_seed(0)
    d = 16
    weight = nn.Parameter(torch.zeros(d, 3 * d))
    scales = torch.tensor([1.0, 10.0, 100.0]).repeat_interleave(d)  # blocks of very different size
    weight.grad = torch.randn(d, 3 * d) * scales
    group = {"params": [weight], "muon": True, **({"blocks": blocks} if blocks > 1 else {})}
    MuonAdamW([group], lr=1.0, weight_decay=0.0).step()
    for i, block in enumerate(weight.detach().chunk(3, dim=-1)):
        s = torch.linalg.svdvals(-block / (0.2 * d ** 0.5 if blocks == 3 else 0.2 * (3 * d) ** 0.5))
        if blocks == 3:
            assert s.min() > 0.6 and s.max() < 1.25, s
        elif i == 0:
            assert s.max() < 0.3, s  # the small block is swamped by the large ones


def test_split_qkv_puts_gpt2s_fused_attention_matrices_in_a_group_of_their_own(examples, family):
    model = tiny_model(examples, family)
    trainable = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    fused, _ = build_optimizer(model, trainable, TrainConfig(optimizer="muon"))
    split, scales = build_optimizer(model, trainable, TrainConfig(optimizer="muon", muon_qkv="split"))
    assert all("blocks" not in g for g in fused.param_groups)
    in_blocks = [p for g in split.param_groups if g.get("blocks") == 3 for p in g["params"]]
    if family == "gpt2":
        assert {id(p) for p in in_blocks} == {id(layer.attn.c_attn.weight) for layer in model.backbone.layers}
        assert scales == [4.0, 4.0, 1.0]
    else:  # Llama's q, k and v are separate matrices already
        assert not in_blocks and fused_blocks(model) == {}
    # the same parameters either way, each once
    assert sorted(id(p) for g in split.param_groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ConfigError, match="muon_qkv"):
        TrainConfig(optimizer="muon", muon_qkv="heads")


def test_a_group_multiplier_carries_into_both_of_its_halves(examples):
    model = tiny_model(examples)
    own = list(model.projection.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in own)]
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=2e-3)
    opt, scales = build_optimizer(model, [{"params": rest, "lr_scale": 1.0}, {"params": own, "lr_scale": 5.0}], cfg)
    assert scales == [2.0, 1.0, 10.0, 5.0]
    assert [g["muon"] for g in opt.param_groups] == [True, False, True, False]


def test_adamw_is_the_default_and_other_names_are_refused():
    assert TrainConfig().optimizer == "adamw"
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="muon_lr"):
        TrainConfig(optimizer="muon", muon_lr=0)
    with pytest.raises(ConfigError, match="stages.latent.optimizer"):
        tiny_config(**{"stages.latent.optimizer": "lion"})


def _muon_run(run_dir, steps=20):
    config = tiny_run_config(steps=steps, eval_every=10)
    config = dataclasses.replace(config, stages={"cot": dataclasses.replace(config.stage("cot"), optimizer="muon",
                                                                           muon_lr=0.01)})
    model, objective, encoded, _ = tiny_setup(config)
    fit(model, objective, encoded, config.stage("cot"), run_dir, quiet=True)
    return model


def test_a_muon_run_learns_and_resumes_to_the_same_weights(tmp_path, one_thread):  # bitwise across two runs
    whole = _muon_run(tmp_path / "whole")
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses
    # the same run, stopped after its step-10 checkpoint: resume must restore Muon's momenta
    # and AdamW's moments, or the last ten steps differ
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000020")
    (tmp_path / "cut" / "done.json").unlink()
    resumed = _muon_run(tmp_path / "cut")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
