"""PGD's smallest adversarial distance against the exact distance of linear classifiers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipcert.attacks import minimal_adversarial_distance, perturbation_norms


def _linear_classifier(seed: int, classes: int) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(6, classes)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    return model


def _exact_distance(model: nn.Linear, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Distance to the nearest decision boundary of an affine classifier: min over j of
    (f_y - f_j) / ||w_y - w_j||_* (dual norm: l2 for l2, l1 for l_inf)."""
    logits = model(x)
    y = logits.argmax(dim=1)
    diffs = model.weight[y][:, None, :] - model.weight[None, :, :]  # (B, C, d)
    margins = logits.gather(1, y[:, None]) - logits  # (B, C)
    dual = diffs.abs().sum(-1) if norm == "linf" else diffs.norm(dim=-1)
    ratio = torch.where(margins > 0, margins / dual.clamp_min(1e-12), torch.inf)
    return ratio.amin(dim=1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("classes", [2, 3])
def test_smallest_distance_matches_the_exact_one_of_a_linear_classifier(norm, classes):
    """Binary: PGD walks straight to the boundary, so the bisection alone sets the precision.
    Three classes: PGD climbs the largest wrong logit, which need not be the nearest boundary,
    so some points come out farther (never closer) than the exact distance."""
    model = _linear_classifier(0, classes)
    x = torch.randn(40, 6)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
        exact = _exact_distance(model, x, norm)
    upper = exact * 0.7  # too small: the search has to double it first
    found = minimal_adversarial_distance(model, x, y, upper, norm, steps=40, bisections=12)
    ratio = found / exact
    assert bool((ratio >= 1 - 1e-5).all())  # nothing closer than the boundary
    assert float(ratio.median()) <= 1.001
    if classes == 2:
        assert float(ratio.max()) <= 1.001


def test_points_pgd_cannot_flip_get_inf():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([100.0, 0.0]))  # class 0 everywhere near x
    x = torch.zeros(3, 4)
    found = minimal_adversarial_distance(model, x, torch.zeros(3, dtype=torch.long), torch.ones(3))
    assert bool(torch.isinf(found).all())  # 16 (the largest ball) < 100


def test_perturbation_norms():
    x = torch.zeros(2, 1, 2, 2)
    x_adv = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]]).reshape(2, 1, 2, 2)
    assert perturbation_norms(x_adv, x, "l2").tolist() == pytest.approx([5.0, 2.2913], rel=1e-4)
    assert perturbation_norms(x_adv, x, "linf").tolist() == [4.0, 2.0]
