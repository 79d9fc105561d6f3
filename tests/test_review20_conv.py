"""Red-team review of the operator-norm and convolution bounds (twentieth session): the repros of
the faults found, each failing before its fix, against exact float64 norms."""

from __future__ import annotations

import pytest
import torch
from lipschitz import jacobian_spectral_norm
from torch import nn

import lipcert.nn as lnn
from lipcert.bounds import gram_spectral_bound
from lipcert.bounds.conv import conv2d_operator_bound


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
