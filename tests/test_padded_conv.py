"""conv_operator_norm: sound against exact dense norms at every geometry, tight at known sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lipschitz import jacobian_matrix
from torch import nn

from lipcert.bounds.network import module_bound
from lipcert.bounds.padded_conv import (
    ConvGeometry,
    circular_norm,
    conv_operator_norm,
    max_copies,
    module_geometry,
)

#: bound / exact for 3 x 3 "same" convolutions on 16 x 16 inputs: random kernels measured
#: 1.006-1.013; the worst case is a kernel whose gain peaks at frequency 0, which the torus contains
#: but a zero-padded n-pixel input reaches only up to cos(pi / (n + 1)) per axis (a constant
#: kernel: 9 / (1 + 2 cos(pi / 17))^2 = 1.0231, see test_constant_kernel_is_the_worst_case).
#: design.md §6's benchmark shapes measure <= 1.0055 (benchmarks/conv_tightness.py).
TIGHTNESS_16x16 = 1.024


def dense(conv: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The convolution's matrix on one (c_in, *size) input (float64, bias irrelevant)."""
    return jacobian_matrix(conv.double(), torch.zeros(shape, dtype=torch.float64))


def exact_l2(conv: nn.Module, shape: tuple[int, ...]) -> float:
    return float(torch.linalg.matrix_norm(dense(conv, shape), ord=2))


def random_conv(axes: int, c_in: int, c_out: int, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    conv = (nn.Conv1d if axes == 1 else nn.Conv2d)(c_in, c_out, bias=False, **kwargs)
    return conv.double().requires_grad_(False)


geometries = st.fixed_dictionaries({
    "axes": st.sampled_from([1, 2]),
    "groups": st.sampled_from([1, 2]),
    "c_in_g": st.integers(1, 3),
    "c_out_g": st.integers(1, 3),
    "kernel_size": st.integers(1, 3),
    "stride": st.integers(1, 3),
    "dilation": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, 2, 3, "same", "valid"]),
    "padding_mode": st.sampled_from(["zeros", "circular", "reflect", "replicate"]),
    "size": st.integers(2, 7),
    "seed": st.integers(0, 1000),
})  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(geometries)
def test_bound_covers_the_exact_norm_at_every_geometry(g):
    if g["padding"] == "same":
        assume(g["stride"] == 1)
    conv = random_conv(
        g["axes"], g["c_in_g"] * g["groups"], g["c_out_g"] * g["groups"], g["seed"],
        kernel_size=g["kernel_size"], stride=g["stride"], padding=g["padding"],
        dilation=g["dilation"], groups=g["groups"], padding_mode=g["padding_mode"],
    )  # fmt: skip
    spatial = (g["size"],) * g["axes"] if g["axes"] == 1 else (g["size"], g["size"] + 1)
    shape = (conv.in_channels, *spatial)
    try:
        exact = exact_l2(conv, shape)
    except RuntimeError:  # torch refuses the geometry (input smaller than the kernel, ...)
        assume(False)
    assert conv_operator_norm(conv.weight, module_geometry(conv, spatial)) >= exact


@pytest.mark.parametrize(("c_in", "c_out"), [(8, 8), (3, 16), (16, 8)])
def test_bound_is_within_tolerance_of_the_exact_norm(c_in, c_out):
    conv = random_conv(2, c_in, c_out, seed=c_in + c_out, kernel_size=3, padding=1)
    exact = exact_l2(conv, (c_in, 16, 16))
    bound = conv_operator_norm(conv.weight, module_geometry(conv, (16, 16)))
    assert exact <= bound <= TIGHTNESS_16x16 * exact


def test_constant_kernel_is_the_worst_case():
    """All-ones 3 x 3 kernel: exact norm (1 + 2 cos(pi / (n + 1)))^2 (the DST modes), bound 9."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double().requires_grad_(False)
    conv.weight.fill_(1.0)
    exact = (1 + 2 * math.cos(math.pi / 17)) ** 2
    assert exact_l2(conv, (1, 16, 16)) == pytest.approx(exact, rel=1e-12)
    bound = conv_operator_norm(conv.weight, module_geometry(conv, (16, 16)))
    assert bound == pytest.approx(9.0, rel=1e-12)
    assert bound / exact <= TIGHTNESS_16x16


@pytest.mark.parametrize("n", [3, 5, 7])
def test_the_torus_must_hold_the_padding(n):
    """The difference kernel [1, -1] zero-padded on n (odd) pixels reaches 2 sin(n pi / (2n + 2)),
    above every frequency of the n-torus: the torus of the input alone would not be a bound."""
    conv = nn.Conv1d(1, 1, 2, padding=1, bias=False).double().requires_grad_(False)
    conv.weight.copy_(torch.tensor([[[1.0, -1.0]]]))
    exact = exact_l2(conv, (1, n))
    assert exact == pytest.approx(2 * math.sin(n * math.pi / (2 * n + 2)), rel=1e-12)
    assert conv_operator_norm(conv.weight, module_geometry(conv, (n,))) >= exact
    input_torus = circular_norm(conv.weight[None, :, :, None, :], (1, n), (1, 1))
    assert input_torus < exact


def test_circular_padding_is_exact():
    """Circular padding of (k - 1) / 2 is the circular convolution itself: no slack at all."""
    for stride in (1, 2):
        conv = random_conv(2, 3, 4, seed=stride, kernel_size=3, padding=1, stride=stride,
                           padding_mode="circular")  # fmt: skip
        exact = exact_l2(conv, (3, 6, 8))
        assert conv_operator_norm(conv.weight, module_geometry(conv, (6, 8))) == pytest.approx(
            exact, rel=1e-9
        )


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("kernel_size", "padding"), [(3, 1), ((5, 3), (2, 1))])
@pytest.mark.parametrize("groups", [1, 2])
def test_circular_padding_is_exact_on_either_gram_side(stride, kernel_size, padding, groups):
    """Enough channels for the Cholesky test of the Grams (8 rows or more): the input side
    (stride 1, 10 polyphase channels a group against 12) and the output side (stride 2, 40
    against 12), formed from the kernel's self-correlation."""
    conv = random_conv(2, 10 * groups, 12 * groups, seed=stride, kernel_size=kernel_size,
                       padding=padding, stride=stride, groups=groups,
                       padding_mode="circular")  # fmt: skip
    exact = exact_l2(conv, (10 * groups, 6, 8))
    bound = conv_operator_norm(conv.weight, module_geometry(conv, (6, 8)))
    assert exact <= bound <= exact * (1 + 1e-9)


def test_float32_weights_are_bounded_as_stored():
    conv = nn.Conv2d(4, 5, 3, padding=1, stride=2).requires_grad_(False)
    conv.weight.mul_(100)
    bound = conv_operator_norm(conv.weight, module_geometry(conv, (7, 6)))
    assert bound >= exact_l2(conv, (4, 7, 6))


def test_padding_copies():
    assert max_copies(6, (2, 2), "reflect") == 2  # x1, x2, x3, x4 appear twice
    assert max_copies(5, (2, 2), "reflect") == 3  # x2 is reflected from both ends
    assert max_copies(5, (2, 3), "replicate") == 4  # the last pixel, plus three copies
    assert max_copies(3, (2, 2), "circular") == 3  # x1 once, and as both wraps
    assert max_copies(4, (0, 0), "reflect") == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2},
        {"kernel_size": 3, "padding": 1, "stride": 2, "padding_mode": "circular"},
        {"kernel_size": 2, "stride": 2},
    ],
)
def test_size_free_fallback_covers_every_size(kwargs):
    for axes in (1, 2):
        conv = random_conv(axes, 4, 4, seed=0, **kwargs)
        bound = module_bound(conv, "l2")  # no input shape: conv2d_operator_bound
        for n in (4, 7):
            shape = (4, *(n,) * axes)
            assert bound >= exact_l2(conv, shape)
            assert bound >= module_bound(conv, "l2", shape) / 1.03  # within the grid slack


def test_size_free_fallback_refuses_copying_padding():
    conv = random_conv(2, 2, 2, seed=0, kernel_size=3, padding=1, padding_mode="reflect")
    with pytest.raises(TypeError, match="reflect padding: the bound needs the input size"):
        module_bound(conv, "l2")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_linf_bound_is_the_largest_row_sum(padding_mode):
    conv = random_conv(2, 3, 4, seed=1, kernel_size=3, padding=1, groups=1,
                       padding_mode=padding_mode)  # fmt: skip
    matrix = dense(conv, (3, 6, 6))
    exact = float(matrix.abs().sum(dim=1).max())
    bound = module_bound(conv, "linf", (3, 6, 6))
    assert exact <= bound
    if padding_mode == "zeros":  # an interior output sees every tap
        assert bound == pytest.approx(exact, rel=1e-12)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="padding_mode"):
        ConvGeometry((4, 4), (1, 1), (1, 1), ((1, 1), (1, 1)), padding_mode="mirror")
    with pytest.raises(ValueError, match="one entry per axis"):
        ConvGeometry((4, 4), (1,), (1, 1), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        conv_operator_norm(torch.ones(2, 2, 3), ConvGeometry((4, 4), (1, 1), (1, 1),
                                                              ((1, 1), (1, 1))))  # fmt: skip


@pytest.mark.parametrize("scale", [2.0**-1060, 2.0**-1000, 1e-30, 1e30, 2.0**1000])
def test_kernels_of_any_magnitude_stay_bounded(scale):
    """The kernel is divided by one power of two before its symbol is formed: kernels far from
    1 (subnormal products, a Gram that would overflow) keep a bound >= their exact norm, the
    norm being homogeneous in the kernel."""
    conv = random_conv(2, 2, 3, seed=1, kernel_size=3, stride=2, padding=1)
    geometry = module_geometry(conv, (6, 5))
    exact, at_one = exact_l2(conv, (2, 6, 5)), conv_operator_norm(conv.weight, geometry)
    with torch.no_grad():
        conv.weight.mul_(scale)
    bound = conv_operator_norm(conv.weight, geometry)
    assert math.isfinite(bound)
    assert bound >= exact * scale
    if scale >= 2.0**-1000:  # normal-range taps: as tight as at scale 1
        assert bound == pytest.approx(at_one * scale, rel=1e-12)
