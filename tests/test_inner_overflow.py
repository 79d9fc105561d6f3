"""No value a module kept whole computes inside overflows in a certified ball
(``lipcert.bounds.network.internal_growth``, read by ``graph.overflow_radius``).

Each model is built so that an inner value overflows (inf, then NaN or an infinite logit) at a
point where the output alone looked far from overflowing; each test checks that the computed
class really changes there, that the certified radius stops short of it, and that every point
up to the radius computes the certified class. Before, each was certified beyond that point.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipcert
import lipcert.nn as lnn
from lipcert import certify
from lipcert.bounds.network import internal_growth
from lipcert.data.normalize import Normalize
from lipcert.nn.cayley import _largest_frobenius_norm
from lipcert.nn.linf import PlainLinfDist


def _head(weights: list[float], biases: list[float], features: int = 1) -> nn.Linear:
    head = nn.Linear(features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = torch.tensor(weights)
        head.bias.copy_(torch.tensor(biases))
    return head


def _sll() -> nn.Module:
    """W = 1e18 (T = 1e36, finite): the layer is -x for x > 0, but W^T x is inf from 3.4e20;
    certified at 0 with radius 1e30 before."""
    layer = lnn.SLLLinear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(1e18)
        layer.bias.zero_()
    return nn.Sequential(layer, _head([1.0, -1.0], [1e30, -1e30]))


def _normalize() -> nn.Module:
    """(x + 3e38) / 1e30 is ~3e8 near 0, but x + 3e38 is inf from x = 4e37; the zero weight of
    the head then gives NaN logits (argmax 0, where the certified class is 1)."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 1e-3], [0.0, -1e-3]]))
        head.bias.copy_(torch.tensor([0.0, 1e35]))
    return nn.Sequential(Normalize([-3e38, 0.0], [1e30, 1.0]), head)


def _cayley() -> nn.Module:
    """An orthogonal convolution of a constant 32 x 32 image of norm 2e37: its output is ~2e37,
    but the FFT's DC sum is 6e38 = inf, and the output NaN (argmax: class 0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        lnn.CayleyConv2d(1, 1, 3, 32), nn.Flatten(), _head([1e-3, 0.0], [-1e35, 1e35], 1024)
    )


def _plain_linf_dist() -> nn.Module:
    """||x - 0|| + 2e38 - 2e38 = |x|, but the biased distance is inf from x = 1.4e38."""
    full = torch.full((1,), 2e38)
    layer = PlainLinfDist(torch.zeros(1, 1), full, full.clone(), math.inf)
    return nn.Sequential(layer, _head([-1e-4, 1e-4], [1e35, -1e35]))


def _l2_pool() -> nn.Module:
    """sqrt(x^2 + 3e38) is ~1.7e19 near 0, but x^2 + 3e38 is inf from x = 6.3e18; certified at
    0 with radius 1.3e19 before (each squared entry below the float max, not with eps added)."""
    return nn.Sequential(
        lnn.L2NormPool2d(None, eps=3e38), nn.Flatten(), _head([-1e-10, 1e-10], [1e30, -1e30])
    )


def _softplus() -> nn.Module:
    """log1p(exp(x)) (threshold inf, the form the bound rule accepts) is ~x, but exp(x) is inf
    from x = 88.7 in float32: the logits are (-inf, inf) at x = 100, certified at 0 with radius
    1e6."""
    return nn.Sequential(nn.Softplus(1.0, math.inf), _head([-1e-3, 1e-3], [1e3, -1e3]))


class _SoftplusCall(nn.Module):
    def forward(self, x):
        return F.softplus(x, beta=1.0, threshold=math.inf)


def _functional_softplus() -> nn.Module:
    """:func:`_softplus` with ``F.softplus`` (the graph builds the module from the call)."""
    return nn.Sequential(_SoftplusCall(), _head([-1e-3, 1e-3], [1e3, -1e3]))


def _hardswish(activation: nn.Module) -> nn.Module:
    """x * min(max(x + 3, 0), 6) / 6 is x above 3, but the product is inf from x = 5.7e37 in
    float32; the zero weight of the head then gives NaN logits (class 0, where 0 is certified
    class 1 with radius 1.13e38 before)."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 1e-3], [0.0, -1e-3]]))
        head.bias.copy_(torch.tensor([0.0, 1e36]))
    return nn.Sequential(activation, head)


class _HardswishCall(nn.Module):
    def forward(self, x):
        return F.hardswish(x)


CASES = {
    # name: (model, input shape, norm, the distance along the first axis (an image: the
    # constant direction) where the computed class flips)
    "SLLLinear": (_sll, (1,), "l2", 4e20),
    "Normalize": (_normalize, (2,), "l2", 1e38),
    "CayleyConv2d": (_cayley, (1, 32, 32), "l2", 2e37),
    "PlainLinfDist": (_plain_linf_dist, (1,), "linf", 1.5e38),
    "L2NormPool2d": (_l2_pool, (1, 1, 1), "l2", 7e18),
    "Softplus": (_softplus, (1,), "l2", 100.0),
    "F.softplus": (_functional_softplus, (1,), "l2", 100.0),
    "Hardswish": (lambda: _hardswish(nn.Hardswish()), (2,), "l2", 6e37),
    "F.hardswish": (lambda: _hardswish(_HardswishCall()), (2,), "l2", 6e37),
}


def _check_no_overflow_inside(model, shape, norm, flips_at):
    x = torch.zeros(1, *shape)
    direction = torch.zeros_like(x)
    direction.view(-1)[0] = 1.0
    if len(shape) == 3:  # the constant image, of l2 norm 1
        direction = torch.ones_like(x) / math.sqrt(x.numel())
    y = model(x).argmax(1)
    beyond = model(x + flips_at * direction)
    assert beyond.argmax(1).item() != y.item() or not torch.isfinite(beyond).all()
    radius = certify(model, x, y, norm=norm).item()
    assert radius < flips_at
    for t in torch.linspace(0, 1, 41).tolist():
        out = model(x + t * radius * direction)
        assert torch.isfinite(out).all() and out.argmax(1).item() == y.item()


@pytest.mark.parametrize("name", list(CASES))
def test_no_inner_value_overflows_inside_a_certified_ball(name):
    build, shape, norm, flips_at = CASES[name]
    _check_no_overflow_inside(build().eval(), shape, norm, flips_at)


def test_the_exported_sll_form_is_checked_too():
    _check_no_overflow_inside(lipcert.export(_sll().eval()), (1,), "l2", 4e20)


def test_ordinary_nets_keep_an_overflow_radius_far_beyond_their_inputs():
    torch.manual_seed(0)
    nets = {
        (64,): nn.Sequential(*[lnn.SLLLinear(64, 64) for _ in range(4)], nn.Linear(64, 10)),
        (16, 8, 8): nn.Sequential(
            lnn.SLLConv2d(16, 32, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(1024, 10)
        ),
        (3, 8, 8): nn.Sequential(
            Normalize([0.5] * 3, [0.25] * 3),
            lnn.CayleyConv2d(3, 8, 3, 8),
            nn.Flatten(),
            nn.Linear(512, 10),
        ),
    }
    for shape, net in nets.items():
        summary = lipcert.bounds.graph.graph_bound(net.eval(), shape)
        assert summary.overflow_radius > 1e33, (shape, summary.overflow_radius)


@pytest.mark.parametrize("seed", range(5))
def test_batch_norm_growth_bounds_the_values_its_kernels_may_form(seed):
    """x - mean times 1, |w|, 1 / sqrt(var + eps) or their product a, and x a, stay below
    c + g ||h||."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(6).eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(6) * 10.0 ** torch.randint(-3, 4, (6,)))
        norm.running_var.copy_(torch.rand(6) * 10.0 ** torch.randint(-3, 4, (6,)))
        norm.weight.copy_(torch.randn(6) * 10)
    offset, gain = internal_growth(norm, "l2")
    weight = norm.weight.double().abs()
    inverse_std = (norm.running_var.double() + norm.eps).rsqrt()
    scale = weight * inverse_std
    for _ in range(20):
        h = torch.randn(6, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, ()).item()
        centred = h - norm.running_mean.double()
        forms = [centred, centred * weight, centred * inverse_std, centred * scale, h * scale]
        largest = torch.cat(forms).abs().max()
        assert largest <= offset + gain * h.norm()


@pytest.mark.parametrize(("channels", "grid"), [((4, 4), 8), ((3, 6), (6, 10)), ((6, 3), 5)])
def test_cayley_growth_bounds_the_largest_frequency_norm_of_any_spectrum(channels, grid):
    """The growth's s bounds max_w ||Q(w)||_2 of the Q the forward uses, here replaced by a
    random one whose frequencies differ in norm by up to 1e6 (the Cayley transform's own Q is
    unitary, where any norm of it is about 1); and it is a Frobenius bound, no looser than
    sqrt(min(C_out, C_in)) times the largest norm."""
    torch.manual_seed(0)
    layer = lnn.CayleyConv2d(*channels, 3, grid).eval()
    shape = (*layer.input_size[:1], layer.input_size[1] // 2 + 1, *channels)
    scales = 10.0 ** (6 * torch.rand(shape[:2]))[..., None, None]
    spectrum = torch.randn(shape, dtype=torch.complex64) * scales
    layer._unitary = lambda cached: spectrum
    exact = float(torch.linalg.matrix_norm(spectrum.to(torch.complex128), ord=2).amax())
    bound = _largest_frobenius_norm(layer)
    assert exact <= bound <= exact * min(channels) ** 0.5 * (1 + 1e-4)
    _, gain = internal_growth(layer, "l2")
    assert gain >= 2 * bound * math.prod(layer.input_size)
