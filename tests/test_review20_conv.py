"""Red-team review of the operator-norm and convolution bounds (twentieth session): the repros of
the faults found, each failing before its fix, against exact float64 norms."""

from __future__ import annotations

import math

import pytest
import torch
from lipschitz import jacobian_spectral_norm
from torch import nn

import lipcert.nn as lnn
from lipcert.bounds import gram_spectral_bound
from lipcert.bounds.conv import conv2d_operator_bound
from lipcert.bounds.padded_conv import ConvGeometry, conv_operator_norm


def test_gram_bound_ignores_autocast():
    """Under ``torch.autocast("cpu", bfloat16)`` the Gram products of a float32 matrix ran in
    bfloat16 while the rounding allowance was float32's: 6 x 5 Gaussian matrices (seeds 0-49)
    were bounded below their norm in 27 cases of 50, up to 0.35% (seed 6: 3.2227 against 3.2340)."""
    for seed in range(50):
        w = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))
        exact = float(torch.linalg.matrix_norm(w.double(), ord=2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bound = gram_spectral_bound(w)
        assert bound.dtype == torch.float32
        assert float(bound) >= exact
        assert torch.equal(bound, gram_spectral_bound(w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels_get_a_bound(dtype):
    """The symbol was formed from twiddles in the kernel's dtype: complex32 against a complex64
    kernel for float16 (a RuntimeError), no complex type at all for bfloat16, so a
    SpectralConv2d in half precision could not run its forward. The bound is computed in
    float32, which holds the half kernel exactly."""
    kernel = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=torch.float64).requires_grad_(False)
    conv.weight.copy_(kernel.double())
    exact = jacobian_spectral_norm(conv, torch.zeros(3, 7, 6, dtype=torch.float64))
    assert float(conv2d_operator_bound(kernel)) >= exact
    layer = lnn.SpectralConv2d(3, 4, 3).to(dtype)
    out = layer(torch.randn(2, 3, 6, 6).to(dtype))
    assert out.dtype == dtype and layer.weight.dtype == dtype
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("channels", [2, 12])  # Grams below and above the Cholesky path's 8 rows
@pytest.mark.parametrize(("bad", "expected"), [(float("inf"), math.inf), (float("nan"), None)])
def test_a_non_finite_kernel_gets_inf_or_nan_whatever_its_size(channels, bad, expected):
    """An infinite tap gave inf below 8 Gram rows and a LinAlgError from LAPACK above."""
    weight = torch.randn(channels, channels, 3, 3)
    weight[0, 0, 1, 1] = bad
    geometry = ConvGeometry((6, 6), (1, 1), (1, 1), ((1, 1), (1, 1)))
    bound = conv_operator_norm(weight, geometry)
    assert bound == expected if expected is not None else math.isnan(bound)


def test_gram_bound_takes_many_iterations():
    """n_iter >= 63 divided by the int 2^63, which overflowed."""
    matrix = torch.randn(5, 4, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(matrix, ord=2).item()
    bound = gram_spectral_bound(matrix, n_iter=70).item()
    assert exact <= bound <= exact * 1.001
