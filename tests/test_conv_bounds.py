"""conv2d_operator_bound: sound against exact dense norms, tight against the symbol's supremum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import jacobian_spectral_norm
from torch import nn

from lipcert.bounds.conv import (
    DEFAULT_GRID_SLACK,
    conv2d_operator_bound,
    grid_factor,
    grid_size,
    grid_twiddles,
    polyphase_kernel,
)

#: Largest measured bound / exact ratio for 8-16 channel random 3 x 3 kernels on 16 x 16 inputs
#: (1.032, the grid slack 1.02 times the zero-padding deficit ~1.011 at this size), with margin.
TIGHTNESS_16x16 = 1.04
#: The Gram-iteration slack at the maximising frequency of a random kernel (measured <= 1e-4).
GRAM_SLACK = 1e-3
#: Grid of the dense reference supremum: its spacing (2 pi / 256) misses the peak by < 0.1%.
DENSE_GRID = 256

kernel_sides = st.sampled_from([1, 2, 3, 5])
channels = st.integers(1, 5)


def exact_norm(kernel: torch.Tensor, stride, padding, size, padding_mode="zeros") -> float:
    """Exact l2 norm of the convolution on a (c_in, *size) input: float64 Jacobian + SVD."""
    conv = nn.Conv2d(
        kernel.shape[1], kernel.shape[0], tuple(kernel.shape[-2:]), stride, padding,
        bias=False, padding_mode=padding_mode, dtype=torch.float64,
    )  # fmt: skip
    conv.requires_grad_(False).weight.copy_(kernel)
    return jacobian_spectral_norm(conv, torch.zeros((kernel.shape[1], *size), dtype=torch.float64))


def dense_supremum(kernel: torch.Tensor) -> float:
    """max sigma_1(K^(w)) over a dense frequency grid (a lower bound of the supremum)."""
    symbol = torch.fft.fft2(kernel.double(), s=(DENSE_GRID, DENSE_GRID))  # (o, i, N, N)
    return float(torch.linalg.matrix_norm(symbol.permute(2, 3, 0, 1), ord=2).max())


def random_kernel(c_out, c_in, size, seed, scale=1.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn((c_out, c_in, *size), generator=gen, dtype=dtype)


@given(
    channels, channels, kernel_sides, kernel_sides, st.sampled_from([1, 2]),
    st.sampled_from([1, 2]), st.integers(0, 3), st.integers(0, 3), st.integers(-3, 3),
    st.integers(0, 1000),
)  # fmt: skip
def test_bound_covers_the_exact_zero_padded_norm(c_out, c_in, kh, kw, s1, s2, extra_h, extra_w,
                                                 log_scale, seed):  # fmt: skip
    kernel = random_kernel(c_out, c_in, (kh, kw), seed, scale=10.0**log_scale)
    size = (kh + extra_h + 1, kw + extra_w + 2)  # non-square
    padding = (kh // 2, kw // 2)
    bound = float(conv2d_operator_bound(kernel, (s1, s2)))
    assert bound >= exact_norm(kernel, (s1, s2), padding, size)
    assert bound >= exact_norm(kernel, (s1, s2), 0, size)  # "valid": a restriction too
    assert bound >= exact_norm(kernel, (s1, s2), (kh, kw), size)  # more padding than taps


@given(channels, channels, kernel_sides, st.integers(0, 3), st.integers(0, 1000))
def test_stride_one_bound_covers_circular_padding_at_any_stride_and_size(c_out, c_in, k, extra,
                                                                         seed):  # fmt: skip
    kernel = random_kernel(c_out, c_in, (k, k), seed)
    bound = float(conv2d_operator_bound(kernel))
    for stride in (1, 2):
        size = (k + extra + 1, k + 2)  # odd sizes: not a multiple of the stride
        padding = (k - 1) // 2  # more would wrap twice: ConstrainedConv2d refuses it
        assert bound >= exact_norm(kernel, stride, padding, size, padding_mode="circular")


def test_strided_bound_needs_stride_one_for_circular_padding_of_odd_sizes():
    """Why circular padding uses the stride-1 bound: kernel [1, 1, 0], stride 2, a 1 x 3 torus."""
    kernel = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    circular = exact_norm(kernel, (1, 2), (0, 1), (1, 3), padding_mode="circular")
    assert circular == pytest.approx(math.sqrt(3))  # rows [1, 0, 1], [0, 1, 1]
    assert float(conv2d_operator_bound(kernel, (1, 2))) < circular  # the polyphase norm sqrt(2)
    assert float(conv2d_operator_bound(kernel, 1)) >= circular


@pytest.mark.parametrize(("size", "stride"), [((3, 3), (2, 2)), ((5, 4), (2, 3)), ((2, 2), (3, 1))])
def test_polyphase_kernel_turns_the_strided_conv_into_a_stride_one_conv(size, stride):
    kernel = random_kernel(3, 2, size, seed=0)
    poly = polyphase_kernel(kernel, stride)
    x = torch.randn((1, 2, 4 * stride[0], 4 * stride[1]), dtype=torch.float64)
    strided = F.conv2d(x, kernel, stride=stride)
    unshuffled = x.reshape(1, 2, 4, stride[0], 4, stride[1]).permute(0, 1, 3, 5, 2, 4)
    same = F.conv2d(unshuffled.reshape(1, 2 * stride[0] * stride[1], 4, 4), poly)
    rows, cols = min(strided.shape[-2], same.shape[-2]), min(strided.shape[-1], same.shape[-1])
    torch.testing.assert_close(strided[..., :rows, :cols], same[..., :rows, :cols])


@pytest.mark.parametrize(("c_out", "c_in", "size"), [(8, 8, 16), (4, 8, 16), (8, 6, 14)])
def test_bound_is_tight_for_random_kernels(c_out, c_in, size):
    kernel = random_kernel(c_out, c_in, (3, 3), seed=c_out + c_in)
    bound = float(conv2d_operator_bound(kernel))
    exact = exact_norm(kernel, 1, 1, (size, size))
    assert exact <= bound <= TIGHTNESS_16x16 * exact
    supremum = dense_supremum(kernel)
    most = supremum * grid_factor((3, 3), grid_size((3, 3), DEFAULT_GRID_SLACK)) * (1 + GRAM_SLACK)
    assert supremum <= bound <= most


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 5), (2, 3), (1, 5), (4, 4)])
def test_grid_step_correction_covers_peaks_between_grid_points(kernel_size):
    """A plane wave peaked half a grid step from every grid point: the grid max alone misses it."""
    grid = grid_size(kernel_size, DEFAULT_GRID_SLACK)
    a1 = torch.arange(kernel_size[0], dtype=torch.float64)[:, None]
    a2 = torch.arange(kernel_size[1], dtype=torch.float64)[None]
    for j in range(4):
        peak = [2 * math.pi * (j + 0.5) / n for n in grid]
        kernel = torch.cos(peak[0] * a1 + peak[1] * a2 + j)[None, None]  # (1, 1, kh, kw)
        assert float(conv2d_operator_bound(kernel)) >= dense_supremum(kernel)


def test_grid_size_meets_the_slack():
    for kernel_size in [(3, 3), (5, 5), (1, 3), (7, 2)]:
        for slack in (0.05, 0.02, 0.005):
            assert grid_factor(kernel_size, grid_size(kernel_size, slack)) <= 1 + slack
    assert grid_size((1, 1), 0.02) == (1, 1)
    assert grid_size((3, 3), 0.02) == (32, 32)


@given(channels, channels, kernel_sides, st.sampled_from([1, 2]), st.integers(0, 1000))
def test_float32_bound_covers_the_exact_norm_of_the_float32_kernel(c_out, c_in, k, stride, seed):
    kernel = random_kernel(c_out, c_in, (k, k), seed, scale=100.0, dtype=torch.float32)
    bound = conv2d_operator_bound(kernel, stride)
    assert bound.dtype == torch.float32
    assert float(bound) >= exact_norm(kernel.double(), stride, k // 2, (k + 3, k + 4))


def test_bound_is_differentiable_with_the_gradient_of_the_maximum():
    kernel = random_kernel(2, 3, (3, 3), seed=0).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: conv2d_operator_bound(k), (kernel,), atol=1e-6)
    bound = conv2d_operator_bound(kernel)
    (grad,) = torch.autograd.grad(bound, kernel)
    with torch.no_grad():
        assert torch.equal(bound, conv2d_operator_bound(kernel))  # same value without autograd
    # Homogeneous of degree 1: <grad, K> = bound (Euler).
    assert float((grad * kernel.detach()).sum()) == pytest.approx(float(bound.detach()), rel=1e-9)


def test_autocast_does_not_lower_the_precision_of_the_bound():
    kernel = random_kernel(4, 3, (3, 3), seed=0, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bound = conv2d_operator_bound(kernel)
    assert bound.dtype == torch.float32
    assert torch.equal(bound, conv2d_operator_bound(kernel))


def test_one_by_one_kernel_is_the_matrix_norm():
    kernel = random_kernel(4, 6, (1, 1), seed=0)
    exact = torch.linalg.matrix_norm(kernel[..., 0, 0], ord=2)
    assert float(exact) <= float(conv2d_operator_bound(kernel)) <= float(exact) * (1 + 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kernel": torch.ones(3, 3, 3)}, "kernel"),
        ({"stride": 0}, "stride"),
        ({"stride": (1, 2, 3)}, "stride"),
        ({"grid_slack": 0.0}, "grid_slack"),
        ({"grid_slack": 1.5}, "grid_slack"),
        ({"n_iter": -1}, "n_iter"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        conv2d_operator_bound(**{"kernel": torch.ones(2, 2, 3, 3), **kwargs})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_twiddles_are_a_new_tensor_each_call(dtype):
    """The angles are computed once per shape and cached: each call hands out its own copy, so a
    caller writing into one cannot change the bound of the next."""
    kernel = torch.zeros(1, dtype=dtype)
    first = grid_twiddles((3, 3), (8, 8), kernel, origin=(1, 1))
    expected = first.clone()
    first.fill_(7.0)
    again = grid_twiddles((3, 3), (8, 8), kernel, origin=(1, 1))
    assert again.dtype == dtype
    assert torch.equal(again, expected)
