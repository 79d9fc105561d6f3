"""Rules for softmax, interpolation, copies, max / min values, vector norms and LP pools: sound
against exact float64 Jacobian norms, tight where the constant is attained, refusals named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lipschitz import jacobian_norm, worst_points
from torch import nn

import lipcert
import lipcert.nn as lnn
from lipcert.attacks import pgd
from lipcert.bounds.graph import graph_bound
from lipcert.bounds.network import module_bound
from lipcert.certify import certify


class Lambda(nn.Module):
    """``fn(self, x)`` with a linear layer ``fc`` (4 -> 6) and a module ``op`` to hand."""

    def __init__(self, fn, op: nn.Module | None = None) -> None:
        super().__init__()
        self.fn, self.op = fn, op
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fn(self, x)


def _image(m, x):
    """The linear layer's 6 outputs as a (1, 2, 3) image, for the spatial ops."""
    return m.fc(x).view(-1, 1, 2, 3)


#: Small models (inputs of 4 entries) in which each new rule applies: (forward, module op).
MODELS = {
    "softmax": (lambda m, x: F.softmax(m.fc(x), dim=1), None),
    "softmax of rows": (lambda m, x: m.fc(x).view(-1, 2, 3).softmax(-1), None),
    "softmin": (lambda m, x: F.softmin(3 * m.fc(x), dim=1), None),
    "log_softmax": (lambda m, x: torch.log_softmax(m.fc(x), 1), None),
    "Softmax2d": (lambda m, x: m.op(m.fc(x).view(-1, 3, 2, 1)), nn.Softmax2d()),
    "nearest upsample": (lambda m, x: m.op(_image(m, x)), nn.Upsample(scale_factor=2)),
    "nearest 1.5": (lambda m, x: F.interpolate(_image(m, x), scale_factor=1.5), None),
    "bilinear": (
        lambda m, x: F.interpolate(_image(m, x), size=(3, 5), mode="bilinear"),
        None,
    ),
    "bilinear corners": (
        lambda m, x: m.op(_image(m, x)),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    ),
    "antialiased bilinear": (
        lambda m, x: F.interpolate(_image(m, x), size=(1, 2), mode="bilinear", antialias=True),
        None,
    ),
    "area": (lambda m, x: F.interpolate(m.fc(x)[:, None], size=4, mode="area"), None),
    "repeat": (lambda m, x: m.fc(x).repeat(1, 3), None),
    "tile": (lambda m, x: torch.tile(m.fc(x).view(-1, 2, 3), (2, 1)), None),
    "expand": (lambda m, x: m.fc(x)[:, None].expand(x.size(0), 4, -1), None),
    "expand_as": (lambda m, x: m.fc(x)[:, None].expand_as(torch.stack([m.fc(x)] * 3, 1)), None),
    "repeat_interleave": (
        lambda m, x: m.fc(x).repeat_interleave(torch.tensor([1, 3, 0, 2, 1, 1]), dim=1),
        None,
    ),
    "rsub": (lambda m, x: torch.rsub(m.fc(x), 1.0, alpha=-2.5), None),
    "max values": (lambda m, x: m.fc(x).view(-1, 2, 3).max(dim=2).values, None),
    "min values": (lambda m, x: torch.min(m.fc(x).view(-1, 2, 3), 1)[0], None),
    "maximum": (lambda m, x: torch.maximum(m.fc(x), x.sum(1, keepdim=True)), None),
    "max of two": (lambda m, x: torch.max(m.fc(x), torch.ones(6)), None),
    "l2 norm": (lambda m, x: torch.linalg.vector_norm(m.fc(x).view(-1, 2, 3), dim=2), None),
    "l1 norm": (lambda m, x: m.fc(x).view(-1, 3, 2).norm(p=1, dim=1), None),
    "l3 norm": (lambda m, x: torch.norm(m.fc(x), 3, dim=1, keepdim=True), None),
    "linf norm": (lambda m, x: m.fc(x).view(-1, 2, 3).norm(p=math.inf, dim=-1), None),
    "lp pool 2": (lambda m, x: m.op(m.fc(x)[:, None]), nn.LPPool1d(2, 3, stride=1)),
    "lp pool 4": (lambda m, x: F.lp_pool2d(_image(m, x), 4, 2, stride=1), None),
    "lp pool 1": (lambda m, x: m.op(m.fc(x)[:, None]), nn.LPPool1d(1, 2, 1, ceil_mode=True)),
    "lp pool inf": (lambda m, x: m.op(_image(m, x)), nn.LPPool2d(math.inf, 2, stride=1)),
}


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("name", list(MODELS))
def test_new_rules_cover_exact_jacobian_norms(name, norm):
    """Random points of three scales and gradient ascent of the exact Jacobian norm."""
    fn, op = MODELS[name]
    torch.manual_seed(0)
    model = Lambda(fn, op).double().eval()
    bound = lipcert.lipschitz_upper_bound(model, (4,), norm)
    worst = max(worst_points(model, (4,), norm))
    assert 0 < worst <= bound


def _point(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


class Op(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


#: Ops alone, with a point where their Jacobian norm reaches (or nearly reaches) the constant:
#: (op, point, smallest exact / bound in l2, in l_inf).
ATTAINED = {
    "softmax": (lambda x: x.softmax(1), _point([0.0, 0.0]), 1.0, 1.0),
    "softmax of 5": (lambda x: x.softmax(1), _point([0, 0, -30, -30, -30]), 1.0, 1.0),
    "log_softmax": (lambda x: F.log_softmax(x, 1), _point([30.0, 0.0, 0.0, 0.0]), 1.0, 1.0),
    "nearest": (lambda x: F.interpolate(x, scale_factor=(2, 3)), _zeros(1, 2, 2), 1.0, 1.0),
    "nearest 1.5": (lambda x: F.interpolate(x, scale_factor=1.5), _zeros(1, 4), 1.0, 1.0),
    "bilinear": (
        lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
        _zeros(1, 6, 6),
        1.0,
        1.0,
    ),
    "repeat": (lambda x: x.repeat(1, 2, 3), _zeros(2, 2), 1.0, 1.0),
    "expand": (lambda x: x[:, :, None].expand(-1, -1, 5), _zeros(3), 1.0, 1.0),
    "max values": (lambda x: x.max(1).values, _point([[1.0, 0.0], [0.0, 1.0]]), 1.0, 1.0),
    "l2 norm": (lambda x: x.norm(dim=1), _point([1.0, 1.0, 1.0, 1.0]), 1.0, 1.0),
    "l1 norm": (lambda x: x.norm(p=1, dim=1), _point([1.0, -1.0, 1.0]), 1.0, 1.0),
    "lp pool 2": (lambda x: F.lp_pool1d(x, 2, 2), _point([[1.0, 1.0, 1.0, 1.0]]), 1.0, 1.0),
}


@pytest.mark.parametrize("name", list(ATTAINED))
def test_new_rules_are_tight_where_the_constant_is_attained(name):
    fn, x, l2_ratio, linf_ratio = ATTAINED[name]
    model = Op(fn).double()
    for norm, ratio in (("l2", l2_ratio), ("linf", linf_ratio)):
        bound = lipcert.lipschitz_upper_bound(model, tuple(x.shape), norm)
        exact = float(jacobian_norm(model, x, norm))
        assert exact <= bound and exact >= ratio * bound * (1 - 1e-9), (norm, exact, bound)


def test_softmax_module_rules_know_their_dims_and_sizes():
    """The modules' shaped rules: 1/2 for softmax; log-softmax sqrt(n) of the normalized dim."""
    assert module_bound(nn.Softmax(dim=-1), "l2", (3, 5)) == 0.5
    assert module_bound(nn.LogSoftmax(dim=1), "l2", (9, 2)) == 3.0
    assert module_bound(nn.LogSoftmax(dim=-1), "l2", (9, 2)) == pytest.approx(math.sqrt(2))
    assert module_bound(nn.LogSoftmax(dim=2), "linf", (9, 2)) == 2.0
    assert module_bound(nn.Softmax(), "linf", (4,)) == 0.5  # implicit dim 1 of a 2-D input


#: Refused, with the operation named: (module or forward of x, input shape, message pattern).
REFUSED = {
    "softmax over the batch": (lambda x: F.softmax(x, 0), (4,), "dimension 0, the batch"),
    "implicit softmax dim of 3-D inputs": (nn.Softmax(), (2, 2), "the batch"),
    "log_softmax over the batch": (lambda x: x.log_softmax(-2), (4,), "the batch"),
    "bicubic": (
        lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"),
        (1, 3, 3),
        "'bicubic' has negative weights",
    ),
    "bicubic module": (
        nn.Upsample(scale_factor=2, mode="bicubic"),
        (1, 3, 3),
        "negative weights",
    ),
    "repeat of the batch": (lambda x: x.repeat(2, 1), (4,), "Tensor.repeat.*batch"),
    "repeat adding a dim": (lambda x: x.repeat(1, 1, 2), (4,), "Tensor.repeat.*batch"),
    "tile adding a dim": (lambda x: x.tile((2, 1, 1)), (4,), "Tensor.tile.*batch"),
    "tile of the batch": (lambda x: torch.tile(x, (3, 1)), (4,), "tile.*batch"),
    "expand adding a dim": (lambda x: x.expand(2, 1, 4), (4,), "Tensor.expand.*batch"),
    "expand_as adding a dim": (
        lambda x: x.expand_as(torch.zeros(3, 1, 4)),
        (4,),
        "expand_as.*batch",
    ),
    "repeat_interleave flat": (lambda x: x.repeat_interleave(2), (4,), "batch"),
    "repeat_interleave of the batch": (lambda x: x.repeat_interleave(2, 0), (4,), "batch"),
    "max of everything": (lambda x: torch.max(x), (4,), "torch.max.*batch"),
    "max over the batch": (lambda x: x.max(0).values, (4,), "Tensor.max.*batch"),
    "max indices": (lambda x: x.max(1).indices.double(), (4,), "reads the indices"),
    "max indices by position": (lambda x: 1.0 * torch.min(x, -1)[1], (4,), "reads the indices"),
    "max unpacked": (lambda x: x.max(1)[0] + x.max(1)[-1], (4,), "reads the indices"),
    "norm of everything": (lambda x: x.norm(), (4,), "Tensor.norm.*batch"),
    "norm over the batch": (
        lambda x: torch.linalg.vector_norm(x, dim=(0, 1)),
        (4,),
        "vector_norm.*batch",
    ),
    "norm p = 1/2": (lambda x: x.norm(p=0.5, dim=1), (4,), "p = 0.5"),
    "norm p = 0": (lambda x: torch.linalg.vector_norm(x, 0, 1), (4,), "p = 0"),
    "norm p = 1.5": (lambda x: x.norm(p=1.5, dim=1), (4,), "p = 1.5"),
    "nuclear norm": (lambda x: x.norm(p="nuc", dim=(1, 2)), (2, 2), "p = 'nuc'"),
    "lp pool 3": (lambda x: F.lp_pool1d(x, 3, 2), (1, 4), r"LPPool1d\(norm_type=3"),
    "lp pool 1.5": (nn.LPPool2d(1.5, 2), (1, 4, 4), "LPPool2d"),
    "lp pool ceil": (nn.LPPool1d(2, 3, ceil_mode=True), (1, 4), "ceil_mode=True"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_uses_are_refused_by_name(name):
    op, shape, match = REFUSED[name]
    model = op if isinstance(op, nn.Module) else Op(op)
    for norm in ("l2", "linf"):
        with pytest.raises(TypeError, match=match):
            lipcert.lipschitz_upper_bound(model, shape, norm)


def test_certified_softmax_net_is_not_broken_by_pgd():
    """A hidden softmax layer between linear layers: certify, then PGD at the radii."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Softmax(dim=1), nn.Linear(8, 8), nn.LogSoftmax(dim=1),
        nn.Linear(8, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[2].weight.mul_(20)
    x = torch.randn(48, 4)
    y = model(x).argmax(1)
    for norm in ("l2", "linf"):
        radii = certify(model, x, y, norm=norm)
        assert (radii > 0).float().mean() > 0.5
        keep = radii > 0
        eps = radii[keep] * (1 - 1e-6)
        _, broken = pgd(model, x[keep], y[keep], eps, norm, steps=40, restarts=2)
        assert not broken.any()


class Underflow(nn.Module):
    """Logits (||s x||_2 / s, threshold): the norm of an input scaled down to where its squares
    are subnormal, scaled back up."""

    def __init__(self, scale: float, threshold: float) -> None:
        super().__init__()
        self.scale, self.threshold = scale, threshold

    def forward(self, x):
        norm = torch.linalg.vector_norm(x * self.scale, dim=1, keepdim=True) / self.scale
        return F.pad(norm, (0, 1), value=self.threshold)


def test_underflow_of_a_norms_squares_is_in_the_rounding_allowance():
    """In float32, (s x)^2 for s = 1e-22, ||x|| = 0.27 is 7.3e-46, a subnormal that rounds to
    2^-149: the norm reads 0.37 (class 0 against the threshold 0.3); at ||x|| = 0.25, 0.02 away,
    the square rounds to 0 and the class flips. With the underflow term of other operations
    (N tiny L / L_n, 2e-15 here) x was certified at 0.052; a root of p-th powers is resolved to
    (N tiny)^(1/p) only, which the allowance now takes (3.8e3 here: no radius)."""
    model = Underflow(1e-22, 0.3).eval()
    x = torch.tensor([[0.27, 0.0, 0.0, 0.0]])
    near = torch.tensor([[0.25, 0.0, 0.0, 0.0]])
    assert model(x).argmax(1).item() == 0 and model(near).argmax(1).item() == 1
    assert graph_bound(model, (4,)).underflow_error > 1
    assert certify(model, x, torch.tensor([0])).item() <= 0.02


class L2PoolUnderflow(nn.Module):
    """Logits (l2 pool of s x, over the whole map, / s, threshold): lipcert's own l2 pool with
    eps = 0 on an input scaled down to where its squares are subnormal."""

    def __init__(self, scale: float, threshold: float) -> None:
        super().__init__()
        self.pool, self.scale, self.threshold = lnn.L2NormPool2d(None, eps=0.0), scale, threshold

    def forward(self, x):
        norm = self.pool(x * self.scale).flatten(1) / self.scale
        return F.pad(norm, (0, 1), value=self.threshold)


def test_underflow_of_the_l2_pools_squares_is_in_the_rounding_allowance():
    """The l2 pool sums squares too (its ``output_root``): at x = 0.595 e_0 the pool of
    1e-22 x, scaled back, reads 0.75 (class 0 against 0.3), at 0.59 it reads 0 (class 1); a
    radius of 0.32 was certified with the underflow term of other layers."""
    model = L2PoolUnderflow(1e-22, 0.3).eval()
    x, near = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0], near[0, 0, 0, 0] = 0.595, 0.59
    assert model(x).argmax(1).item() == 0 and model(near).argmax(1).item() == 1
    assert graph_bound(model, (1, 2, 2)).underflow_error > 1
    assert certify(model, x, torch.tensor([0])).item() <= 0.005


class Cancelled(nn.Module):
    """Logits (c, a - a) with a = ``inner(x)``: exactly (c, 0), class 0 everywhere, but NaN
    (class 1: argmax takes NaN for the largest) wherever a overflows."""

    def __init__(self, inner: nn.Module, c: float) -> None:
        super().__init__()
        self.inner, self.c = inner, c

    def forward(self, x):
        a = self.inner(x).flatten(1)
        return F.pad(a - a, (1, 0), value=self.c)


class ScaledUpAndBack(nn.Module):
    def forward(self, x):
        return x * 1e30 * 1e-30


@pytest.mark.parametrize(
    ("inner", "x0", "overflows_at"),
    [
        (nn.LPPool1d(4, 2), 1e9, 4.3e9),  # x^4 > 3.4e38 beyond 4.29e9
        (ScaledUpAndBack(), 1e7, 3.5e8),  # x * 1e30 > 3.4e38 beyond 3.4e8
    ],
)
def test_no_value_overflows_inside_a_certified_ball(inner, x0, overflows_at):
    """A value that overflows at x' but not at x changes the computed class at x' (NaN): the
    LP pool was certified at 3.5e10 around 1e9 and its class flipped at 2e10 (x^4 = inf); the
    radius now keeps ||x|| + r below the overflow radius, and every point up to it computes
    the certified class."""
    model = Cancelled(inner, 1e11).eval()
    x = torch.zeros(1, 1, 2)
    x[0, 0, 0] = x0
    beyond = x.clone()
    beyond[0, 0, 0] = overflows_at * 1.01
    assert model(beyond).argmax(1).item() == 1  # the computed class flips there
    radius = certify(model, x, torch.tensor([0])).item()
    assert 0 < radius < overflows_at - x0
    for t in torch.linspace(0, 1, 50):
        near = x.clone()
        near[0, 0, 0] += t * radius
        assert model(near).argmax(1).item() == 0


def test_ordinary_nets_have_an_overflow_radius_far_beyond_their_inputs():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    assert graph_bound(model, (8,)).overflow_radius > 1e35


def _cancelling_linear(shift: float) -> nn.Module:
    """Logits 30 (-1, 1; 1, -1) (x + shift, shift) + (6e37, -6e37): class 0 while 30 x < 1.2e38,
    but the product 30 (x + shift) overflows once x + shift > 1.13e37 (-inf, inf: class 1)."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [0.0]]))
        first.bias.fill_(shift)
        second.weight.copy_(30 * torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        second.bias.copy_(torch.tensor([6e37, -6e37]))
    return nn.Sequential(first, second).eval()


@pytest.mark.parametrize(("shift", "certified"), [(1e37, False), (1e35, True)])
def test_no_partial_sum_of_a_linear_map_overflows_inside_a_certified_ball(shift, certified):
    """A linear map's partial sums can cancel where its output does not: with a shift of 1e37
    the class flipped at x = 1.35e36 inside a certified radius of 1.41e36 (only the outputs'
    sizes were checked); a shift of 1e35 overflows only beyond 1.1e37 and stays certified
    (1.14e36)."""
    model = _cancelling_linear(shift)
    overflows_at = 3.4028235e38 / 30 - shift
    beyond = torch.tensor([[overflows_at * 1.01]])
    assert model(beyond).argmax(1).item() == 1
    x = torch.zeros(1, 1)
    radius = certify(model, x, torch.tensor([0])).item()
    assert radius < overflows_at and (radius > 1e36) == certified
    for t in torch.linspace(0, 1, 50):
        assert model(x + t * radius).argmax(1).item() == 0


class ExpandBySizeKeyword(nn.Module):
    """``expand(size=...)``, the batch size first by keyword (``shape`` is view's keyword)."""

    def forward(self, x):
        return x[:, :1].expand(size=(x.size(0), 4)) + x


def test_expand_takes_the_batch_size_by_its_size_keyword():
    model = ExpandBySizeKeyword()
    x = torch.randn(4, dtype=torch.float64)  # one sample
    for norm in ("l2", "linf"):
        bound = graph_bound(model, (4,), norm).bound
        assert bound >= jacobian_norm(model, x, norm).item() * (1 - 1e-12)
    assert graph_bound(model, (4,), "l2").bound == pytest.approx(3.0)
