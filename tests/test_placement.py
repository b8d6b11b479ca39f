"""Device placement, checked on the CPU with PyTorch's `meta` device standing in for a GPU:
both bugs below crashed the first CUDA run of the GSM8K ladder (results/gsm8k_smollm2/)."""

import torch

from system15.layout import encode
from system15.train import objective_for
from system15.train.loop import to_device

from tests.helpers import tiny_config, tiny_model


def _leaves(batch):
    if torch.is_tensor(batch):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _leaves(v)


def test_every_tensor_of_a_stage1_batch_reaches_the_device(examples):
    """Stage 1 with the probe keeps one batch per latent step in a list."""
    model = tiny_model(examples)
    config = tiny_config(**{"stage1.probe": 1.0})
    batch = objective_for("latent", config).collate(model, [encode(model.tokenizer, e) for e in examples[:4]])
    assert isinstance(batch["probes"], list) and batch["probes"]
    moved = list(_leaves(to_device(batch, "meta")))
    assert len(moved) == len(list(_leaves(batch))) > 0
    assert all(t.device.type == "meta" for t in moved)


def test_shortcuts_are_built_beside_the_backbone(examples):
    """Stage 2 adds routers and adapters to a model already on its device."""
    model = tiny_model(examples).to("meta")
    model.add_shortcuts()
    assert {p.device.type for p in model.shortcuts.parameters()} == {"meta"}
