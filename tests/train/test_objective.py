"""What every training method shares (train/objective.py): the NLL averaged per example, the
loss terms the log reads, the scale of a layer's states, the defaults of an Objective, and
the latent path a thought step takes."""

import math

import pytest
import torch

from system15.layout import IGNORE
from system15.train.objective import (Objective, example_nll, layer_std, masked_std, metrics_on_device, scalars,
                                      thought_forward)
from system15.train.stage1 import LatentDistillation
from tests.helpers import encoded, tiny_config, tiny_model


def test_the_nll_is_the_mean_over_examples_of_each_examples_mean():
    """Two labels on row 0 (NLL log 2 and log 4/3), one on row 1 (log 4/3), padding ignored:
    ((log 2 + log 4/3) / 2 + log 4/3) / 2, not the mean over the three tokens."""
    third = math.log(3)
    logits = torch.tensor([[[0.0, 0.0], [third, 0.0], [5.0, -5.0]],
                           [[0.0, third], [1.0, 2.0], [3.0, 4.0]]])
    labels = torch.tensor([[1, 0, IGNORE], [1, IGNORE, IGNORE]])
    row0 = (math.log(2) + math.log(4 / 3)) / 2
    assert example_nll(logits, labels).item() == pytest.approx((row0 + math.log(4 / 3)) / 2)
    assert example_nll(logits, labels).item() != pytest.approx((math.log(2) + 2 * math.log(4 / 3)) / 3)


def test_a_row_without_labels_counts_as_zero_not_nan():
    logits = torch.zeros(2, 2, 3)
    labels = torch.tensor([[0, 1], [IGNORE, IGNORE]])
    assert example_nll(logits, labels).item() == pytest.approx(math.log(3) / 2)


def test_loss_terms_are_floats_for_the_log_and_stay_on_the_device_inside_the_loop():
    x = torch.tensor(1.5, requires_grad=True) * 2
    logged = scalars(nll=x)
    assert logged == {"nll": 3.0} and isinstance(logged["nll"], float)
    with metrics_on_device():
        kept = scalars(nll=x)["nll"]
    assert isinstance(kept, torch.Tensor) and not kept.requires_grad and kept.item() == 3.0
    assert isinstance(scalars(nll=x)["nll"], float)  # only while it lasts


def test_the_masked_scale_is_the_scale_of_the_states_it_keeps():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 8, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    states[~mask] = 1e3  # what the mask leaves out must not move the scale
    torch.testing.assert_close(masked_std(states, mask), layer_std(states[mask]))
    assert layer_std(torch.zeros(4, 8)).item() == pytest.approx(1e-6)  # floored: never divides by zero


def test_an_objectives_defaults_keep_the_earlier_of_equal_scores_and_freeze_the_shortcuts(examples):
    objective = Objective()
    assert objective.replaces_best(0.6, 0.5) and not objective.replaces_best(0.5, 0.5)
    assert objective.selectable(0, 10) and objective.eval_K(None) == 0
    model = tiny_model(examples, shortcuts=True)
    model.requires_grad_(False)
    objective.prepare(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("shortcuts."))
    assert not any(p.requires_grad for p in model.shortcuts.parameters())
    assert model.method == "?" and model.spec.K == 0
    (group,) = objective.param_groups(model)
    assert group["lr_scale"] == 1.0 and len(group["params"]) == sum(p.requires_grad for p in model.parameters())


def test_changing_P_changes_the_latent_path_but_not_answer_only(examples):
    model = tiny_model(examples)
    batch = LatentDistillation(tiny_config()).collate(model, encoded(model, examples[:4]))["student"]
    with torch.no_grad():
        before = thought_forward(model, batch, K=2).nll
        nocot_before = thought_forward(model, batch, K=0).nll
        model.projection.net[2].weight.normal_()
        model.projection.net[2].bias.normal_()
        after = thought_forward(model, batch, K=2).nll
        nocot_after = thought_forward(model, batch, K=0).nll
    assert not torch.equal(before, after)
    assert torch.equal(nocot_before, nocot_after)
