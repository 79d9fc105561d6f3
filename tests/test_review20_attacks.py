"""Review of the twentieth session: the attacks behind "0 certified points broken".

PGD projected its perturbation delta onto the eps-ball, then evaluated the model at x + delta
rounded to the input's dtype: the point it returned (and whose margin counted as a success) lay
outside the ball for every l_inf sample and about half the l2 ones, by 2e-7 eps for pixels in
[0, 1] and by up to 10% of eps for inputs ~1e3 and eps 1e-3. A classifier whose every float32
point in the ball is correct was then reported broken.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipcert.attacks import pgd


def _exact_distances(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """||x_adv - x|| in float64: exact differences of float32 inputs, norms to ~1e-15."""
    diff = (x_adv.double() - x.double()).flatten(1)
    return diff.abs().amax(dim=1) if norm == "linf" else diff.norm(dim=1)


def _threshold() -> nn.Linear:
    """Binary f(x) = x - t with t = 1000 + 2 ulp(1000) in float32 (ulp 2^-14): x - t is exact
    near t, so a float32 input is class 1 (f > 0) or tied (f = 0) only from x = t on."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-(1000 + 2 * 2.0**-14))
    return model


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_finds_no_point_outside_the_ball(norm):
    """At x = 1000 and eps = 1.9 ulp the float32 points of the ball are 1000 and 1000 + ulp, both
    class 0 with margin <= -ulp; x + eps rounds to t, a tie, and PGD called it a success."""
    x, y = torch.tensor([[1000.0]]), torch.tensor([0])
    x_adv, success = pgd(_threshold(), x, y, 1.9 * 2.0**-14, norm, steps=10, restarts=2)
    assert not bool(success.any())
    assert float(_exact_distances(x_adv, x, norm)[0]) <= 1.9 * 2.0**-14


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(("scale", "eps"), [(1.0, 0.1), (1000.0, 1e-3)])
def test_pgd_points_lie_in_the_ball_in_exact_arithmetic(norm, scale, eps):
    torch.manual_seed(0)
    model = nn.Linear(16, 5)
    x = torch.rand(64, 16) * scale
    y = torch.randint(0, 5, (64,))
    x_adv, _ = pgd(model, x, y, eps, norm, steps=8, restarts=2)
    radius = torch.tensor(eps, dtype=torch.float32).double()  # the ball pgd searches
    assert bool((_exact_distances(x_adv, x, norm) <= radius).all())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_in_a_box_stays_in_the_ball_and_the_box(norm):
    torch.manual_seed(1)
    model = nn.Linear(16, 5)
    x = torch.rand(64, 16)
    y = torch.randint(0, 5, (64,))
    x_adv, _ = pgd(model, x, y, 0.3, norm, steps=8, restarts=2, clamp=(0.0, 1.0))
    radius = torch.tensor(0.3, dtype=torch.float32).double()
    assert bool((_exact_distances(x_adv, x, norm) <= radius).all())
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())


def test_pgd_refuses_inputs_outside_its_box():
    """x outside the box: its clamped copy is already off x, possibly beyond eps."""
    x = torch.full((2, 4), 1.5)
    with pytest.raises(ValueError, match="inside the clamp box"):
        pgd(nn.Linear(4, 2), x, torch.zeros(2, dtype=torch.long), 0.1, clamp=(0.0, 1.0))
