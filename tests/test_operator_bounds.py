"""eigen_spectral_bound, gram_max_eigenvalue_bound and
semi_unitary_spectral_bound: above the exact spectral norm (largest eigenvalue), and within 1e-9
of it (the semi-unitary one for matrices near, and also far from, semi-unitary)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipcert.bounds import operator
from lipcert.bounds.operator import (
    eigen_spectral_bound,
    gram_max_eigenvalue_bound,
    semi_unitary_spectral_bound,
)


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


@pytest.mark.parametrize("magnitude", [2.0**127, 1.0, 2.0**-126, 2.0**-149])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_float32_extremes_need_no_rescaling(magnitude, dtype):
    """float32 values are moderate in float64 (no rescaling): the largest (squares 2^254) and the
    subnormal ones (squares 2^-298, still normal) are bounded as the exact values."""
    gen = torch.Generator().manual_seed(1)
    signs = torch.randn(30, 50, generator=gen, dtype=dtype)
    matrix = (signs / signs.abs().amax() * magnitude).to(dtype)
    scaled = matrix.to(torch.complex128 if dtype.is_complex else torch.float64) / magnitude
    exact = float(torch.linalg.svdvals(scaled)[0]) * magnitude
    bound = float(eigen_spectral_bound(matrix))
    assert exact <= bound <= exact * (1 + 1e-9) + 2.0**-1074 * 100


@settings(deadline=None, max_examples=60)
@given(
    batch=st.integers(1, 40),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    rank=st.integers(1, 40),
    complex_=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_maximum_is_above_every_norm_and_tight(batch, rows, cols, rank, complex_, seed):
    """gram_max_eigenvalue_bound of a batch of Grams (the Cholesky test, eigenvalues for a few
    of them) against the largest exact eigenvalue, each matrix of its own size below 2."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    rank = min(rank, rows, cols)
    left = torch.randn(batch, rows, rank, generator=gen, dtype=dtype)
    matrix = left @ torch.randn(batch, rank, cols, generator=gen, dtype=dtype)
    sizes = torch.rand(batch, 1, 1, generator=gen, dtype=torch.float64)
    matrix = matrix / matrix.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300) * sizes
    gram = matrix.mH @ matrix
    exact = float(torch.linalg.eigvalsh(gram)[..., -1].max())
    assert exact <= gram_max_eigenvalue_bound(gram) <= exact * (1 + 1e-9) + 1e-300


def _hermitian_batch(batch: int, n: int, seed: int, complex_: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    a = torch.randn(batch, n, n, generator=gen, dtype=dtype)
    return (a + a.mH) / 2


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_largest_eigenvalue_of_indefinite_matrices(complex_, seed):
    """Signed lambda_max, for Hermitian matrices with negative eigenvalues too."""
    h = _hermitian_batch(30, 12, seed, complex_)
    exact = float(torch.linalg.eigvalsh(h)[..., -1].max())
    assert exact <= gram_max_eigenvalue_bound(h) <= exact * (1 + 1e-9)


def test_a_largest_eigenvalue_outside_the_candidates_is_found():
    """The candidates are the Grams of largest Frobenius norm (identities, lambda 1); the
    rank-one Gram of norm 2 fails the Cholesky test at mu ~ 1 and gets its eigenvalues."""
    n = 16
    identities = torch.eye(n, dtype=torch.float64).expand(10, n, n)
    v = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rank_one = 2 * (v @ v.T) / (v.T @ v)
    batch = torch.cat([identities, rank_one[None], 0.5 * identities[:3]])
    assert float(torch.linalg.matrix_norm(rank_one)) < float(torch.linalg.matrix_norm(batch[0]))
    bound = gram_max_eigenvalue_bound(batch)
    assert 2 <= bound <= 2 * (1 + 1e-9)
    assert gram_max_eigenvalue_bound(batch[:10]) <= 1 + 1e-9  # the identities alone


@pytest.mark.parametrize("scale", [0.0, 1.0, 1e-200])
def test_equal_and_zero_matrices(scale):
    """All matrices at the shift (each Cholesky test fails or barely passes) and all zero."""
    batch = scale * torch.eye(20, dtype=torch.complex128).expand(9, 20, 20)
    bound = gram_max_eigenvalue_bound(batch)
    assert scale <= bound <= scale * (1 + 1e-9) + 1e-300


def test_small_matrices_and_batches_take_the_eigenvalues(monkeypatch):
    """Below CHOLESKY_TEST_MIN_SIZE rows, or with at most EIGEN_CANDIDATES matrices, no
    Cholesky test runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("cholesky_ex called")

    monkeypatch.setattr(operator.torch.linalg, "cholesky_ex", refuse)
    small = _hermitian_batch(30, operator.CHOLESKY_TEST_MIN_SIZE - 1, 0, True)
    few = _hermitian_batch(operator.EIGEN_CANDIDATES, 12, 1, False)
    for h in (small, few):
        exact = float(torch.linalg.eigvalsh(h)[..., -1].max())
        assert exact <= gram_max_eigenvalue_bound(h) <= exact * (1 + 1e-9)


def test_non_finite_matrices_are_refused_as_by_the_eigenvalues():
    h = _hermitian_batch(10, 12, 0, False)
    h[2, 3, 3] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        gram_max_eigenvalue_bound(h)


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
