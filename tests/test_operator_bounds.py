"""eigen_spectral_bound and semi_unitary_spectral_bound: above the exact spectral norm, and
within 1e-9 of it (the semi-unitary one for matrices near, and also far from, semi-unitary)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipcert.bounds.operator import eigen_spectral_bound, semi_unitary_spectral_bound


@settings(deadline=None, max_examples=60)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    rank=st.integers(1, 40),
    exponent=st.sampled_from([-300, -30, 0, 30, 300]),
    complex_=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bound_is_above_the_norm_and_tight(rows, cols, rank, exponent, complex_, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    rank = min(rank, rows, cols)
    left = torch.randn(2, rows, rank, generator=gen, dtype=dtype)
    right = torch.randn(2, rank, cols, generator=gen, dtype=dtype)
    matrix = (left @ right) * 10.0**exponent  # a batch of two, of rank <= ``rank``
    exact = torch.linalg.svdvals(matrix)[..., 0]
    bound = eigen_spectral_bound(matrix)
    assert bound.shape == (2,) and bound.dtype == torch.float64
    assert bool((bound >= exact).all())
    assert bool((bound <= exact * (1 + 1e-9)).all())


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (1, 1)])
def test_zero_matrix_gets_a_tiny_positive_bound(shape):
    bound = float(eigen_spectral_bound(torch.zeros(shape)))
    assert 0 <= bound < 1e-150


def test_float32_input_is_bounded_as_its_exact_values():
    matrix = torch.randn(100, 1568, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(matrix.double())[0]
    assert exact <= eigen_spectral_bound(matrix) <= exact * (1 + 1e-9)


@settings(deadline=None, max_examples=60)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 24),
    scale=st.sampled_from([1e-200, 1e-3, 0.5, 0.999, 1.0, 1.001, 3.0, 1e200]),
    noise=st.sampled_from([0.0, 1e-7, 1e-3, 0.3]),
    complex_=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_semi_unitary_bound_is_above_the_norm_and_tight(rows, cols, scale, noise, complex_, seed):
    # Off the manifold too: singular values all below 1 (scale < 1) gave sqrt(1 + ||G - I||),
    # 1.09 for 0.9 Q, before the bound took lambda_max(G - I); huge and tiny scales rescale.
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    big, small = max(rows, cols), min(rows, cols)
    q = torch.linalg.qr(torch.randn(3, big, small, generator=gen, dtype=dtype))[0]
    q = q if rows >= cols else q.mH
    matrix = scale * (q + noise * torch.randn(q.shape, generator=gen, dtype=dtype))
    exact = float(torch.linalg.svdvals(matrix)[..., 0].max())
    bound = semi_unitary_spectral_bound(matrix)
    assert exact <= bound <= exact * (1 + 1e-9) + 1e-150
