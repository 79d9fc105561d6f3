"""Review of the dead zone of the AOL / SLL row sums' signs (``aol._signs_beyond_noise``: sign 0
where |corr(d)| is within the rounding noise of 0, so that the gradient at AOL's init no longer
follows the noise's device-dependent signs).

The forward values were bit-identical to the code before (row sums, AOL / SLL weights, outputs
and bounds: 1,260 tensors compared), and the gradient at init no longer depended on the order
of the sums. Findings (each test's docstring says on which code it fails):

* the zone was one width for all entries, 16 eps taps max_i corr_ii(0): it swallowed the
  correlations of a column 100x smaller than the largest, and at 1000x its own corr_ii(0),
  whose sign is exactly 1 (float32 gradients 10-77% off the float64 ones; the plain signs
  were within 2e-7). Now per entry, 16 eps taps sqrt(corr_ii(0) corr_jj(0)) (>= the bound
  16 eps S_ij of the noise, as before);
* in half precision the zone (16 eps taps: 1.1 x corr_ii(0) for bfloat16 3 x 3) was wider than
  every correlation: the bfloat16 gradient of the row sums was 0, float16's 88-98% off. Half
  precision keeps the computed signs again;
* a NaN in one output channel's kernel made the whole gradient NaN (torch.sign gives NaN sign
  0, the zone's division gave NaN), overflowing corr turned finite gradients into NaN, and
  float32 kernels of 1e-20 got a zero gradient (the noise floor at finfo.tiny swallowed corr).
"""

from __future__ import annotations

import pytest
import torch

from lipcert.nn.aol import (
    AOLConv2d,
    AOLLinear,
    abs_correlation_sums,
    orthogonal_centre_,
)
from lipcert.nn.constraint import original


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


@pytest.mark.parametrize(
    ("make", "side"),
    [
        (lambda: AOLConv2d(8, 16, 3, rescale="input"), 0),
        (lambda: AOLConv2d(16, 8, 3, rescale="output"), 1),
        (lambda: AOLLinear(24, 32, rescale="input"), 0),
    ],
)
def test_layer_gradient_at_init_does_not_depend_on_the_channel_order(make, side):
    """At init, also with a quarter of the columns 1000x smaller (the per-entry zone): the layer
    with its raw weight's summed-over channels permuted (another order of the same sums, as on
    another device) has the permuted gradient. Fails on the code before the change (the noise's
    signs, off by more than the gradient's size)."""
    torch.manual_seed(0)
    layer = make().train()
    with torch.no_grad():
        raw = original(layer)
        raw[:, : raw.shape[1] // 4] *= 1e-3
    order = torch.randperm(original(layer).shape[side])
    x = torch.randn(3, original(layer).shape[1], *([5, 5] if raw.dim() == 4 else []))
    grads = []
    for permute in (False, True):
        probe = make().train()
        with torch.no_grad():
            original(probe).copy_(raw.index_select(side, order) if permute else raw)
            if probe.bias is not None:
                probe.bias.copy_(layer.bias[order] if permute and side == 0 else layer.bias)
        inputs = x[:, order] if permute and side == 1 else x
        out = probe(inputs)
        target = torch.linspace(-1, 1, out.shape[1])
        target = target[order] if permute and side == 0 else target
        (out.square() * target.view(1, -1, *[1] * (out.dim() - 2))).sum().backward()
        grad = original(probe).grad
        grads.append(grad if permute else grad.index_select(side, order))
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * scale)


def test_the_dead_zone_still_covers_the_noise_at_init():
    """AOL's init with columns of very different sizes: the float32 gradient equals the float64
    one (the zone covers each entry's noise; with the noise's signs they differed by more than
    the gradient). Fails on the code before the change, and on HEAD (the one zone swallowed the
    small columns' corr_ii(0) in float32 only)."""
    torch.manual_seed(0)
    kernel = orthogonal_centre_(torch.empty(32, 16, 3, 3, dtype=torch.float64))
    kernel[:, :4] *= 1e-3
    weights = torch.rand(16, 16, dtype=torch.float64)
    exact = _gradient(kernel, weights)
    assert _relative_error(_gradient(kernel.float(), weights), exact) < 1e-5
