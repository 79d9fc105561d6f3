"""eigen_spectral_bound, gram_max_eigenvalue_bound and
semi_unitary_spectral_bound: above the exact spectral norm (largest eigenvalue), and within 1e-9
of it (the semi-unitary one for matrices near, and also far from, semi-unitary, below
DEFECT_CHOLESKY_MIN_SIZE rows; from it on, near semi-unitary, within DEFECT_TOLERANCE)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lipschitz import positive_definite

from lipcert.bounds import operator
from lipcert.bounds.operator import (
    DEFECT_CHOLESKY_MIN_SIZE,
    DEFECT_TOLERANCE,
    defect_max_eigenvalue_bound,
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


def _eigen_calls(monkeypatch) -> list[int]:
    """Sizes of the batches given LAPACK's eigenvalues by hermitian_max_eigenvalue_bound."""
    calls = []
    original = operator.hermitian_max_eigenvalue_bound

    def counted(matrix):
        calls.append(matrix.reshape(-1, *matrix.shape[-2:]).shape[0])
        return original(matrix)

    monkeypatch.setattr(operator, "hermitian_max_eigenvalue_bound", counted)
    return calls


@settings(deadline=None, max_examples=20)
@given(
    rows=st.integers(DEFECT_CHOLESKY_MIN_SIZE, 160),
    cols=st.integers(DEFECT_CHOLESKY_MIN_SIZE, 160),
    noise=st.sampled_from([0.0, 1e-8, 3e-8]),
    contraction=st.sampled_from([1.0, 0.99]),
    seed=st.integers(0, 2**16),
)
def test_large_semi_unitary_float32_weights_take_cholesky_tests(
    rows, cols, noise, contraction, seed
):
    # float32 weights orthogonal to their precision, some singular values shrunk (a GNP layer's
    # contractive directions): above the exact norm, within DEFECT_TOLERANCE, no eigenvalues
    gen = torch.Generator().manual_seed(seed)
    big, small = max(rows, cols), min(rows, cols)
    q = torch.linalg.qr(torch.randn(big, small, generator=gen, dtype=torch.float64))[0]
    q[:, : small // 3] *= contraction
    q = q if rows >= cols else q.T
    q = (q + noise * torch.randn(q.shape, generator=gen, dtype=torch.float64)).float()
    exact = float(torch.linalg.svdvals(q.double())[0])
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        calls = _eigen_calls(patch)
        bound = semi_unitary_spectral_bound(q)
    assert exact <= bound <= math.sqrt(exact**2 + DEFECT_TOLERANCE) * (1 + 1e-12)
    assert calls == []


def _defect_with_top(n: int, top: float, corner: float, seed: int) -> torch.Tensor:
    """A symmetric float64 D with e_0 an eigenvector of eigenvalue D_00 = ``corner`` (the largest
    diagonal entry where ``top`` is small); on the other coordinates U diag(lambda) U^T with
    lambda in [-1e-3, top] (half of them within 1e-3 relative of ``top``, the top one equal to it
    up to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=gen, dtype=torch.float64))[0]
    values = -1e-3 * torch.rand(n - 1, generator=gen, dtype=torch.float64)
    half = (n - 1) // 2
    values[:half] = top * (1 - 1e-3 * torch.rand(half, generator=gen, dtype=torch.float64))
    values[0] = top
    rest = (u * values) @ u.T
    d = torch.zeros(n, n, dtype=torch.float64)
    d[1:, 1:] = (rest + rest.T) / 2
    d[0, 0] = corner
    return d


@pytest.mark.parametrize("top", [1e-9, 3e-7, 8.6e-7, 2e-6, 1e-5, 1e-3])
def test_defect_bound_is_above_lambda_max_and_within_tolerance(top):
    d = _defect_with_top(96, top, corner=min(top, 2e-7) / 3, seed=int(top * 1e9))
    exact = float(torch.linalg.eigvalsh(d)[-1])  # off by ~1e-19 here
    bound = defect_max_eigenvalue_bound(d)
    assert exact <= bound <= exact + DEFECT_TOLERANCE + 1e-15


def test_defect_bound_mixes_passed_failed_and_eigenvalues(monkeypatch):
    # a batch with the largest diagonal entry 1e-7 (shifts 2e-7, 5e-7, 1.7e-6): one matrix passes
    # the first test, one the third, one none: each bounded, the max returned
    tops = [1.5e-7, 1e-6, 5e-5]
    batch = torch.stack([_defect_with_top(80, t, 1e-7, seed) for seed, t in enumerate(tops)])
    assert float(batch.diagonal(dim1=-2, dim2=-1).max()) == 1e-7
    exact = torch.linalg.eigvalsh(batch)[:, -1]
    calls = _eigen_calls(monkeypatch)
    assert float(exact[:2].max()) <= defect_max_eigenvalue_bound(batch[:2]) <= 1.8e-6
    assert calls == []
    assert defect_max_eigenvalue_bound(batch) >= float(exact.max())
    assert calls == [1]  # only the third matrix got eigenvalues


def test_defect_bound_is_exactly_above_every_eigenvalue(monkeypatch):
    # rational check of bound I - D > 0 where lambda_max sits just above or below a shift, on
    # 9 x 9 matrices (the Cholesky path forced below its size threshold)
    monkeypatch.setattr(operator, "DEFECT_CHOLESKY_MIN_SIZE", 4)
    corner = 1e-7
    for trial in range(20):
        for rung in (1, 4, 16):
            for nudge in (-1e-15, 0.0, 1e-15):
                top = corner * (1 + rung) * (1 + nudge * trial)
                d = _defect_with_top(9, top, corner, seed=trial)
                bound = defect_max_eigenvalue_bound(d)
                level = Fraction(bound)
                shifted = [
                    [(level if i == j else 0) - Fraction(x) for j, x in enumerate(row)]
                    for i, row in enumerate(d.tolist())
                ]
                assert positive_definite(shifted), (trial, rung, nudge, bound)


@pytest.mark.parametrize(("n", "top"), [(16, 1e-3), (64, 8.6e-7)])
def test_cholesky_factor_has_the_backward_error_the_test_allows(n, top):
    # the LAPACK factor of a nearly singular fl(mu I - D): |R^T R - H| <= gamma |R^T| |R| entrywise
    # exactly (Higham Thm. 10.3), gamma = 16 (n + 1) u as shifted_cholesky_bound allows
    d = _defect_with_top(n, top, corner=top / 3, seed=n)
    shift = float(torch.linalg.eigvalsh(d)[-1]) * (1 + 1e-6)
    h = -d
    h.diagonal().add_(shift)
    factor, info = torch.linalg.cholesky_ex(h)
    assert int(info) == 0
    r = [[Fraction(v) for v in row] for row in factor.T.tolist()]  # upper, R^T R = H
    target = [[Fraction(v) for v in row] for row in h.tolist()]
    gamma = Fraction(16 * (n + 1)) * Fraction(2) ** -53
    worst = Fraction(0)
    for i in range(n):
        for j in range(i + 1):  # H's lower triangle, the one LAPACK reads
            products = [r[k][i] * r[k][j] for k in range(j + 1)]
            residual = abs(sum(products) - target[i][j])
            allowed = gamma * sum(abs(x) for x in products)
            assert residual <= allowed, (i, j)
            if allowed:
                worst = max(worst, residual / allowed)
    assert worst < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bounds_factor_and_decompose_on_the_cpu(monkeypatch):
    # the rounding arguments cover LAPACK's routines, not a GPU library's (Jacobi eigenvalues,
    # inverted triangular blocks): on a CUDA batch both run on the CPU, the results as there
    devices = []
    for name in ("eigvalsh", "cholesky_ex"):
        original = getattr(torch.linalg, name)

        def spy(matrix, *args, original=original, **kwargs):
            devices.append(matrix.device.type)
            return original(matrix, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    q = torch.linalg.qr(torch.randn(4, 96, 80, dtype=torch.float64))[0].float()
    gram = torch.randn(6, 16, 16, dtype=torch.complex128)
    gram = gram @ gram.mH
    cpu = (semi_unitary_spectral_bound(q), gram_max_eigenvalue_bound(gram))
    cuda = (semi_unitary_spectral_bound(q.cuda()), gram_max_eigenvalue_bound(gram.cuda()))
    assert cuda == pytest.approx(cpu, rel=1e-12)
    assert set(devices) == {"cpu"}
