"""Pooling and downsampling: exact Jacobian norms, values against torch, the eps, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, jacobian_matrix, jacobian_spectral_norm
from torch import nn

import lipcert
from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.nn.pooling import InvertibleDownsample, L2NormPool2d, ScaledAvgPool2d


@st.composite
def window_cases(draw) -> tuple[tuple[int, int] | None, tuple[int, int] | None, tuple[int, ...]]:
    """(kernel, stride, input shape without batch): non-square windows, gaps, global pooling."""
    channels = draw(st.integers(1, 3))
    if draw(st.integers(0, 4)) == 0:
        return None, None, (channels, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (kernel[0] + draw(st.integers(0, 1)), kernel[1] + draw(st.integers(0, 1)))
    height = draw(st.integers(kernel[0], 2 * stride[0] + 1))
    width = draw(st.integers(kernel[1], 2 * stride[1] + 1))
    return kernel, stride, (channels, height, width)


def _random_input(shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@given(window_cases(), st.booleans())
def test_scaled_avg_pool_has_orthonormal_jacobian_rows(case, training: bool) -> None:
    kernel, stride, shape = case
    jac = jacobian_matrix(ScaledAvgPool2d(kernel, stride).train(training), _random_input(shape))
    singular = torch.linalg.svdvals(jac)
    assert singular.max() <= 1 + LIPSCHITZ_TOL
    torch.testing.assert_close(singular, torch.ones_like(singular), rtol=0, atol=1e-12)


@given(window_cases(), st.booleans())
def test_l2_norm_pool_is_1_lipschitz_and_tight(case, training: bool) -> None:
    kernel, stride, shape = case
    layer = L2NormPool2d(kernel, stride).train(training)
    norm = jacobian_spectral_norm(layer, _random_input(shape))
    assert 1 - 1e-6 <= norm <= 1 + LIPSCHITZ_TOL  # the constant 1 is reached away from 0


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.booleans())
def test_invertible_downsample_is_a_permutation(factor, channels, rows, cols, training) -> None:
    layer = InvertibleDownsample(factor).train(training)
    x = _random_input((channels, rows * factor, cols * factor))
    jac = jacobian_matrix(layer, x)
    assert jac.shape[0] == jac.shape[1] and set(jac.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(torch.linalg.svdvals(jac), torch.ones(x.numel(), dtype=x.dtype))
    torch.testing.assert_close(layer(x[None]), layer.export()(x[None]), rtol=0, atol=0)


def test_values_match_torch_pools() -> None:
    x = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(ScaledAvgPool2d((2, 3))(x), F.avg_pool2d(x, (2, 3)) * math.sqrt(6))
    torch.testing.assert_close(ScaledAvgPool2d(2, 3)(x), F.avg_pool2d(x, 2, 3) * 2)
    torch.testing.assert_close(L2NormPool2d((2, 3), eps=0)(x), nn.LPPool2d(2, (2, 3))(x))
    torch.testing.assert_close(L2NormPool2d(2)(x), nn.LPPool2d(2, 2)(x), rtol=0, atol=2e-6)
    torch.testing.assert_close(ScaledAvgPool2d(None)(x), x.sum((-2, -1), keepdim=True) / 56**0.5)
    torch.testing.assert_close(L2NormPool2d(None, eps=0)(x), x.norm(dim=(-2, -1), keepdim=True))
    torch.testing.assert_close(ScaledAvgPool2d(2)(x[0]), ScaledAvgPool2d(2)(x)[0])  # (C, H, W)


def test_a_window_over_the_whole_map_is_a_sum() -> None:
    """One window covering the map takes the summing path: the values and gradients of
    avg_pool2d times sqrt(kh kw), for a given kernel and for global pooling."""
    x = _random_input((2, 3, 5, 4)).requires_grad_(True)
    expected = F.avg_pool2d(x, (5, 4)) * math.sqrt(20)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    for pool in (ScaledAvgPool2d((5, 4)), ScaledAvgPool2d((5, 4), (6, 9)), ScaledAvgPool2d(None)):
        out = pool(x)
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-13, atol=1e-14)


def test_a_whole_map_pool_exports_to_onnx(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = nn.Sequential(ScaledAvgPool2d((5, 4)), ScaledAvgPool2d(None), nn.Flatten())
    path = tmp_path / "pool.onnx"
    lipcert.export(model, onnx_path=path, input_shape=(3, 5, 4))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 5, 4)
        (out,) = session.run(None, {"input": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-6, atol=1e-6)


def test_l2_norm_pool_gradient_at_zero_is_finite() -> None:
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    L2NormPool2d(2)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    x.grad = None
    L2NormPool2d(2, eps=0.0)(x).sum().backward()  # the exact norm: NaN, as nn.LPPool2d
    assert x.grad.isnan().all()


def test_l2_norm_pool_half_precision_does_not_overflow() -> None:
    x = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16, requires_grad=True)
    out = L2NormPool2d(2)(x)
    out.sum().backward()
    assert out.dtype == torch.float16 and out.item() == 600.0
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


def test_overlapping_windows_are_refused() -> None:
    """The refused configuration is indeed above 1: a pixel sits in up to 4 windows here."""
    for pool in (ScaledAvgPool2d, L2NormPool2d):
        with pytest.raises(ValueError, match=r"stride=\(2, 2\).*overlapping.*4 times"):
            pool(3, stride=2)
        with pytest.raises(ValueError, match="overlapping"):
            pool((2, 2), stride=(2, 1))

    def overlapping(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 3, 2) * 3

    assert jacobian_spectral_norm(overlapping, _random_input((1, 7, 7))) > 1.2


@pytest.mark.parametrize("kernel_size", [0, -1, (2,), (2, 0), 2.5, True, "2"])
def test_bad_kernel_size_raises(kernel_size) -> None:
    for pool in (ScaledAvgPool2d, L2NormPool2d):
        with pytest.raises(ValueError, match="kernel_size"):
            pool(kernel_size)


def test_bad_stride_eps_factor_raise() -> None:
    with pytest.raises(ValueError, match="stride"):
        ScaledAvgPool2d(2, stride=0)
    with pytest.raises(ValueError, match="stride must be None"):
        L2NormPool2d(None, stride=2)
    for eps in (-1e-6, math.nan, math.inf, "1e-6"):
        with pytest.raises(ValueError, match="eps"):
            L2NormPool2d(2, eps=eps)
    for factor in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="factor"):
            InvertibleDownsample(factor)


def test_wrong_input_shape_names_layer_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"ScaledAvgPool2d\(kernel_size=\(3, 3\).*\(2, 4, 2, 5\)"):
        ScaledAvgPool2d(3)(torch.zeros(2, 4, 2, 5))
    with pytest.raises(ValueError, match=r"L2NormPool2d\(kernel_size=None.*\(C, H, W\).*\(2, 4\)"):
        L2NormPool2d(None)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"InvertibleDownsample\(factor=2\).*\(1, 3, 4, 5\)"):
        InvertibleDownsample(2)(torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"InvertibleDownsample\(factor=2\).*\(4, 4\)"):
        InvertibleDownsample(2)(torch.zeros(4, 4))


def test_bounds_and_exports() -> None:
    layers = (ScaledAvgPool2d(2), L2NormPool2d((1, 2)), ScaledAvgPool2d(None), L2NormPool2d(None))
    for layer in layers:
        assert layer.lipschitz_bound() == 1.0 and layer.export() is layer
    down = InvertibleDownsample(2)
    assert down.lipschitz_bound() == 1.0 and type(down.export()) is nn.PixelUnshuffle
    model = nn.Sequential(InvertibleDownsample(2), ScaledAvgPool2d(2), L2NormPool2d(None))
    assert lipschitz_upper_bound(model, input_shape=(3, 8, 12)) == 1.0


@pytest.mark.parametrize("pool", [ScaledAvgPool2d, L2NormPool2d])
def test_windows_set_to_overlap_after_construction_are_refused_by_the_bound(pool):
    """The forward reads kernel_size and stride at every call: a stride of 1 set on a built 2x2
    pool gave a map of norm 1.87 under a bound of 1 (certified 0.186, broken at 0.186)."""
    layer = pool(2)
    layer.stride = (1, 1)
    exact = jacobian_spectral_norm(layer.double(), torch.randn(1, 8, 8, dtype=torch.float64))
    assert exact > 1.5
    with pytest.raises(ValueError, match="overlapping windows"):
        lipschitz_upper_bound(layer)
    with pytest.raises(ValueError, match="overlapping windows"):
        lipschitz_upper_bound(nn.Sequential(layer), input_shape=(1, 8, 8))


def test_a_negative_eps_set_after_construction_is_refused_by_the_bound():
    """sqrt(s + eps) with eps < 0 has an unbounded slope near s = -eps (7.1 under a bound of 1)."""
    layer = L2NormPool2d(None)
    layer.eps = -1.0
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        lipschitz_upper_bound(layer)
