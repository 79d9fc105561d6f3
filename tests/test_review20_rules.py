"""Red-team review of the rules for copies, softmax, interpolation, norms and LP pools and of the
overflow radius: the repros of the faults found, each failing before its fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipcert
import lipcert.nn as lnn
from lipcert.bounds.graph import graph_bound
from lipcert.certify import certify


class TileByShape(nn.Module):
    """x.tile(reps) with reps = (1, 1, 1), read off a tensor's shape (one argument, a node):
    three reps for a 2-D x move the batch to dimension 1, where a sum adds the samples; each
    sample's slot then holds the batch's sum."""

    def forward(self, x):
        reps = x[:, None, None, :1].shape[1:]  # (1, 1, 1) whatever the batch
        y = x.tile(reps)  # (1, B, n)
        total = y.sum(1, keepdim=True).expand(-1, y.size(1), -1)
        return total.reshape(-1, x.size(1))


def test_tile_with_reps_read_off_a_shape_cannot_move_the_batch():
    """The reps, one node, were taken for fewer reps than dims (padded with leading 1s): bound 1;
    certify on x1 = (1, 0) batched with (3, 0) gave radius 2.83 (l2; 2.0 in l_inf) from the
    batch's sum (4, 0), and x1 + (-0.9, 0.9), 1.27 away (0.6 in l_inf, from -0.6, 0.6), is class 1
    on its own."""
    model = TileByShape()
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert torch.equal(model(x), torch.tensor([[4.0, 0.0], [4.0, 0.0]]))  # samples mixed
    for norm in ("l2", "linf"):
        with pytest.raises(TypeError, match=r"Tensor.tile.*batch"):
            lipcert.lipschitz_upper_bound(model, (2,), norm)


class Cancelled(nn.Module):
    """Logits (c, (a - a) / 4) with a = ``inner(x)``: exactly (c, 0), class 0 everywhere, but
    NaN (class 1: argmax takes NaN for the largest) wherever a sum inside ``inner`` overflows."""

    def __init__(self, inner, c: float) -> None:
        super().__init__()
        self.inner, self.c = inner, c

    def forward(self, x):
        a = self.inner(x).flatten(1)
        return F.pad((a - a) / 4, (1, 0), value=self.c)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class WholeMapPool(nn.Module):
    """lipcert's scaled average pool over an (8, 8) map: a sum of the 64 entries over 8."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = lnn.ScaledAvgPool2d(None)

    def forward(self, x):
        return self.pool(x.view(-1, 1, 8, 8))


#: Averages of the 64 entries of a (1, 64) sample: the sum they divide overflows float32 at
#: 6e36 per entry (3.8e38), where the average, the only value recorded, is 6e36 (4.8e37 for the
#: scaled pool).
AVERAGES = {
    "mean": Fn(lambda x: x.mean(-1)),
    "area interpolation": Fn(lambda x: F.interpolate(x, size=1, mode="area")),
    "Upsample area": nn.Upsample(size=1, mode="area"),
    "AvgPool1d": nn.AvgPool1d(64),
    "avg_pool1d": Fn(lambda x: F.avg_pool1d(x, 64)),
    "AdaptiveAvgPool1d": nn.AdaptiveAvgPool1d(1),
    "ScaledAvgPool2d": WholeMapPool(),
}


@pytest.mark.parametrize("name", list(AVERAGES))
def test_no_sum_inside_an_average_overflows_in_a_certified_ball(name):
    """Around x = 0 (margin 1e38) the radius was 1.4e38 in l2 and 3.5e37 in l_inf (8.5e37 and
    1.1e37 for the scaled pool), and every entry 6e36 (4.8e37 away in l2) gives NaN: the sum of
    the average's terms is inf. Now each entry stays below the float32 max over 2 * 64."""
    model = Cancelled(AVERAGES[name], 1e38).eval()
    x, far = torch.zeros(1, 1, 64), torch.full((1, 1, 64), 6e36)
    assert model(far).argmax(1).item() == 1
    for norm, distance in (("l2", 4.8e37), ("linf", 6e36)):
        radius = certify(model, x, torch.tensor([0]), norm=norm).item()
        assert 0 < radius < distance, (norm, radius)
        per_entry = radius / 8 if norm == "l2" else radius
        for t in torch.linspace(0, 1, 20).tolist():
            assert model(torch.full((1, 1, 64), t * per_entry)).argmax(1).item() == 0


class CancelledSum(nn.Module):
    """Logits (c, sum(x / 8 + b)) with b = (a, a, a, a, -a, -a, -a, -a): the sum is ~0 at x = 0,
    but torch adds the four a first, 4 a = 3.36e38 for a = 0.84e38, near the float32 max."""

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.register_buffer("b", torch.tensor([a] * 4 + [-a] * 4))
        self.c = c

    def forward(self, x):
        s = (x / 8 + self.b).sum(1, keepdim=True)
        return F.pad(s, (1, 0), value=self.c)


def test_no_partial_sum_overflows_in_a_certified_ball():
    """Radius 5.0e37 in l_inf around x = 0, where adding 1e37 to the first four entries makes
    4 (a + 1.25e36) overflow: the sum is inf, class 1. Every entry of the summed tensor now stays
    below the float32 max over 2 * 8, which b already exceeds: no radius."""
    model = CancelledSum(0.84e38, 1.2e38).eval()
    x, near = torch.zeros(1, 8), torch.zeros(1, 8)
    near[0, :4] = 1e37
    assert model(x).argmax(1).item() == 0 and model(near).argmax(1).item() == 1
    assert graph_bound(model, (8,), "linf").overflow_radius < 1e37
    assert certify(model, x, torch.tensor([0]), norm="linf").item() < 1e37
