"""The precision of the AOL / SLL row sums' gradient: the signs of the kernel's correlations.

The seventeenth session gave sign 0 to correlations within the rounding noise of 0 (a "dead
zone", so that the gradient at AOL's init no longer followed the noise's device-dependent
signs); the nineteenth removed it: the sums act as an l1 penalty that drives correlations to 0,
and on a trained SLL net the zone held up to 12% of them (the gradient up to 123% off). The
tests below hold for the computed signs: small columns, half precision, NaN, overflow and tiny
kernels keep the float64 gradient, and so do correlations just above the rounding noise.
"""

from __future__ import annotations

import pytest
import torch

from lipcert.nn.aol import AOLConv2d
from lipcert.nn.constraint import original
from lipcert.nn.correlation import abs_correlation_sums


def _gradient(kernel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d/dK of sum(abs_correlation_sums(K) * weights), in float64."""
    kernel = kernel.detach().clone().requires_grad_()
    (abs_correlation_sums(kernel) * weights.to(kernel.dtype)).sum().backward()
    return kernel.grad.double()


def _relative_error(grad: torch.Tensor, exact: torch.Tensor) -> float:
    return float((grad - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize(
    ("shape", "scale", "seed"), [((16, 8, 3, 3), 1e-3, 1), ((16, 8, 3, 3), 1e-2, 2)]
)
def test_a_small_column_keeps_its_gradient(shape, scale, seed):
    """A column 1000x (100x) smaller than the others: its float32 gradient equals the float64
    one to 1e-5 (measured 1.6e-7). The one zone from the largest corr_ii(0) swallowed that
    column's correlations, at 1000x its own corr_ii(0) included: 39% (16%) off. Fails on the
    change's code (HEAD 2c329b6), passes on the code before it."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(shape, generator=gen, dtype=torch.float64)
    kernel[:, 0] *= scale
    weights = torch.rand(shape[1], shape[1], generator=gen, dtype=torch.float64)
    exact = _gradient(kernel, weights)
    assert _relative_error(_gradient(kernel.float(), weights), exact) < 1e-5


def test_a_small_column_keeps_a_layers_gradient():
    """Through AOLConv2d (input side): a raw column 1000x smaller than the others gets the
    float64 layer's gradient in float32 (measured 2.4e-7; the one zone: 7.9e-3). Fails on
    HEAD."""
    torch.manual_seed(0)
    layer = AOLConv2d(6, 8, 3, rescale="input").train()
    with torch.no_grad():
        original(layer).copy_(torch.randn(original(layer).shape))
        original(layer)[:, 0] *= 1e-3
    x = torch.randn(2, 6, 5, 5)
    grads = []
    for dtype in (torch.float32, torch.float64):
        probe = layer.to(dtype)
        original(probe).grad = None
        probe(x.to(dtype)).square().sum().backward()
        grads.append(original(probe).grad.double()[:, 0])
    assert _relative_error(grads[0], grads[1]) < 1e-4


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.bfloat16, (8, 8, 3, 3)),
        (torch.float16, (8, 8, 5, 5)),
        (torch.bfloat16, (6, 10, 1, 1)),
    ],
)
def test_half_precision_kernels_keep_their_gradient(dtype, shape):
    """bfloat16 / float16 kernels: the gradient within 15% of the float64 gradient of the same
    values (measured 0.05-11%, the computed signs). The zone, wider than every correlation
    there, gave 0 (bfloat16 3 x 3), 94-99% off (float16 5 x 5) and 42-51% off (bfloat16 1 x 1).
    Fails on HEAD."""
    gen = torch.Generator().manual_seed(1)
    kernel = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.rand(shape[1], shape[1], generator=gen, dtype=torch.float64)
    exact = _gradient(kernel.double(), weights)
    assert _relative_error(_gradient(kernel, weights), exact) < 0.15


def test_nan_and_overflow_stay_where_the_plain_signs_had_them():
    """A NaN output channel: the other channels' gradients stay finite (torch.sign gives a NaN
    corr sign 0; the zone's division spread NaN everywhere). A kernel whose corr overflows:
    finite gradients as before, not NaN. Fails on HEAD."""
    kernel = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    kernel[0] = float("nan")
    grad = _gradient(kernel, torch.ones(3, 3))
    assert torch.isfinite(grad[1:]).all()
    for shape in [(4, 3, 3, 3), (4, 3, 1, 1)]:
        huge = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1e30
        assert torch.isfinite(_gradient(huge, torch.ones(3, 3))).all()


def test_tiny_kernels_keep_their_gradient():
    """A float32 kernel of 2^-66 (corr subnormal): the gradient is 2^-66 times the unit
    kernel's, as with the plain signs; the noise floor at finfo.tiny made it 0. Fails on HEAD."""
    gen = torch.Generator().manual_seed(0)
    kernel, weights = torch.randn(4, 3, 3, 3, generator=gen), torch.rand(3, 3, generator=gen)
    unit = _gradient(kernel, weights)
    assert _relative_error(_gradient(kernel * 2.0**-66, weights) * 2.0**66, unit) < 1e-6


def _units(kernel: torch.Tensor, taps: int) -> tuple[float, float]:
    """(corr_01(0), the unit) of ``kernel`` in float64: the unit is float32's eps times taps
    sqrt(corr_00(0) corr_11(0)), and the computed float32 corr is within 0.42 units of the
    exact one (measured at exact zeros, kernels 3 x 3 to 11 x 11, 3 to 512 channels)."""
    flat = kernel.double().flatten(2)  # (out, in, taps)
    corr = torch.einsum("oit,ojt->ij", flat, flat)
    return float(corr[0, 1]), torch.finfo(torch.float32).eps * taps * float(
        corr[0, 0] * corr[1, 1]
    ) ** 0.5


@pytest.mark.parametrize("shape", [(16, 8, 1, 1), (16, 8, 3, 3)])
def test_a_correlation_just_above_the_noise_keeps_its_sign(shape):
    """corr_01(0) set to ~2.5 units of the rounding noise's bound (the computed value is within
    0.42 of them): the float32 gradient equals the float64 one to 1e-4 (measured 7e-8, 1.6e-7).
    The dead zone (4 units) gave that correlation sign 0: 8.5% (1 x 1) and 2.7% (3 x 3) off.
    Fails on the code of the seventeenth and eighteenth sessions."""
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(shape, generator=gen, dtype=torch.float64)
    taps, (ch, cw) = shape[2] * shape[3], (shape[2] // 2, shape[3] // 2)
    pivot = kernel[:, 0, ch, cw].clone()
    for _ in range(2):  # moving column 1 along column 0's centre tap sets corr_01(0)
        corr, unit = _units(kernel, taps)
        kernel[:, 1, ch, cw] -= (corr - 2.5 * unit) / float(pivot @ pivot) * pivot
    kernel = kernel.float()
    corr, unit = _units(kernel, taps)
    assert 1.5 < corr / unit < 3.5
    weights = torch.rand(shape[1], shape[1], generator=gen, dtype=torch.float64)
    exact = _gradient(kernel.double(), weights)
    assert _relative_error(_gradient(kernel, weights), exact) < 1e-4
