"""Review of the defect Cholesky ladder (defect_max_eigenvalue_bound, shifted_cholesky_bound and
semi_unitary_spectral_bound from 64 rows on), against exact oracles.

Exact eigenvalues: a I + c H (H the 64 x 64 Sylvester Hadamard matrix, H^2 = 64 I) has
eigenvalues a +- 8 c exactly, its entries a +- c and +-c are exact for dyadic a, c, and a signed
permutation or the phases i^k keep them exact. Q = alpha H + beta I has Q^H Q = (8 alpha + beta)^2
on one eigenspace, so sigma_max(Q) = 8 alpha + beta exactly (alpha, beta >= 0). A generic D gets
its exact Rayleigh quotient at LAPACK's eigenvector, a lower bound of lambda_max(D)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lipcert.bounds import operator
from lipcert.bounds.operator import (
    DEFECT_CHOLESKY_MIN_SIZE,
    DEFECT_TOLERANCE,
    defect_max_eigenvalue_bound,
    semi_unitary_spectral_bound,
)
from lipcert.nn.cayley import CayleyConv2d

EPS = torch.finfo(torch.float64).eps


def _hadamard(m: int) -> torch.Tensor:
    """The m x m Sylvester Hadamard matrix (m a power of two), symmetric, H^2 = m I."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _scramble(matrix: torch.Tensor, seed: int, complex_: bool) -> torch.Tensor:
    """U M U^H for a signed permutation U (times the phases i^k when ``complex_``): exact."""
    gen = torch.Generator().manual_seed(seed)
    n = matrix.shape[-1]
    perm = torch.randperm(n, generator=gen)
    signs = torch.randint(0, 4 if complex_ else 2, (n,), generator=gen)
    phases = (
        torch.tensor([1, 1j, -1, -1j], dtype=torch.complex128)[signs]
        if complex_
        else 1.0 - 2.0 * signs.double()
    )
    m = matrix[..., perm, :][..., :, perm]
    m = m.to(phases.dtype) if complex_ else m
    return phases[:, None] * m * phases.conj()[None, :]


def _hadamard_defect(a: float, c: float, seed: int, complex_: bool) -> torch.Tensor:
    """a I + c H, scrambled: exact entries, lambda_max = a + 8 |c| exactly."""
    d = a * torch.eye(64, dtype=torch.float64) + c * _hadamard(64)
    assert Fraction(float(d[0, 0])) == Fraction(a) + Fraction(c)  # H_00 = 1: a + c is exact
    assert Fraction(float(d[1, 1])) == Fraction(a) - Fraction(c)  # H_11 = -1
    return _scramble(d, seed, complex_)


def _ladder_shift(batch: torch.Tensor, rung: int) -> float:
    """The shift d + rung s that defect_max_eigenvalue_bound tries (rung 1, 4 or 16)."""
    n = batch.shape[-1]
    lowest = float(batch.diagonal(dim1=-2, dim2=-1).real.amax())
    return lowest + rung * max(lowest, n * EPS)


def _rayleigh(d: torch.Tensor, v: torch.Tensor) -> Fraction:
    """The exact Rayleigh quotient v^H D v / v^H v of the Hermitian matrix LAPACK reads (the lower
    triangle and the diagonal's real part), a lower bound of its lambda_max."""
    lower = torch.tril(d, -1)
    full = lower + lower.mH + torch.diag(d.diagonal().real).to(d.dtype)
    if d.is_complex():
        rows = [[(Fraction(z.real), Fraction(z.imag)) for z in row] for row in full.tolist()]
        vec = [(Fraction(z.real), Fraction(z.imag)) for z in v.tolist()]
        num = Fraction(0)
        for (ar, ai), row in zip(vec, rows, strict=True):
            for (br, bi), (hr, hi) in zip(vec, row, strict=True):  # Re(conj(v_i) h_ij v_j)
                num += ar * (hr * br - hi * bi) + ai * (hr * bi + hi * br)
        return num / sum(x * x + y * y for x, y in vec)
    rows = [[Fraction(x) for x in row] for row in full.tolist()]
    vec = [Fraction(x) for x in v.tolist()]
    num = sum(
        vi * sum(h * vj for h, vj in zip(row, vec, strict=True))
        for vi, row in zip(vec, rows, strict=True)
    )
    return num / sum(x * x for x in vec)


# --- defect_max_eigenvalue_bound: lambda_max within a few ulps of each shift


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("rung", [1, 4, 16])
def test_defect_bound_covers_hadamard_eigenvalue_at_every_shift(rung, complex_):
    # a I + c H with d = a + c and a + 8 c = d + rung d: lambda_max sits exactly on the shift,
    # then nudged by a few ulps either side (the factorization of a singular or barely
    # indefinite H passes or fails by rounding)
    c = 2.0**-26
    a0 = (7 - rung) * c / rung  # exact: 6c, 3c/4, -9c/16
    unit = 2 * math.ulp(abs(a0) + c)
    for k in range(-4, 5):
        a = a0 + k * unit
        d = _hadamard_defect(a, c, seed=k + 10 * rung, complex_=complex_)
        exact = Fraction(a) + 8 * Fraction(c)
        gap = abs(Fraction(_ladder_shift(d, rung)) - exact)  # 0 at k = 0: singular there
        assert gap <= (1 + rung) * (abs(k) * Fraction(unit) + Fraction(math.ulp(float(exact))))
        assert k or not gap
        bound = defect_max_eigenvalue_bound(d)
        assert Fraction(bound) >= exact, (rung, k, bound)
        assert bound <= float(exact) + DEFECT_TOLERANCE


@pytest.mark.parametrize("complex_", [False, True])
def test_defect_bound_covers_generic_eigenvalue_next_to_the_shift(complex_):
    # a generic 63 x 63 block (a float32-orthogonal defect, diagonal zeroed) beside a corner entry
    # t, the largest diagonal entry: the shifts 2 t, 5 t, 17 t are put within ulps of the block's
    # lambda_max (an exact Rayleigh quotient, a lower bound of it)
    gen = torch.Generator().manual_seed(3)
    dtype = torch.complex128 if complex_ else torch.float64
    q = torch.linalg.qr(torch.randn(63, 63, generator=gen, dtype=dtype))[0]
    q = q.to(torch.complex64 if complex_ else torch.float32).to(dtype)
    block = q.mH @ q - torch.eye(63, dtype=dtype)
    block.diagonal().zero_()
    top = _rayleigh(block, torch.linalg.eigh(block)[1][:, -1])
    for rung in (1, 4, 16):
        start = float(top / (1 + rung))
        for k in range(-3, 4):
            t = start + k * math.ulp(start)
            d = torch.zeros(64, 64, dtype=dtype)
            d[1:, 1:] = block
            d[0, 0] = t
            exact = max(top, Fraction(t))
            assert abs(Fraction(_ladder_shift(d, rung)) - exact) < 8 * (1 + rung) * Fraction(
                math.ulp(t)
            )
            bound = defect_max_eigenvalue_bound(d)
            assert Fraction(bound) >= exact, (rung, k, bound)
            assert bound <= float(exact) + DEFECT_TOLERANCE


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("rung", [1, 4, 16])
def test_defect_bound_with_the_shift_set_by_another_matrix(rung, complex_):
    # the batch's largest diagonal entry d comes from a diagonal matrix (lambda_max = d); the
    # Hadamard one has smaller diagonal entries and lambda_max within ulps of d + rung d: the
    # batch-level shift cuts through it; extra leading dims, a transposed (non-contiguous) copy
    dtype = torch.complex128 if complex_ else torch.float64
    d_top = 2.0**-23
    corner = torch.diag(torch.linspace(-1e-7, d_top, 64, dtype=torch.float64)).to(dtype)
    c = 4 * d_top if rung == 16 else (1 + rung) * d_top / 8
    a0 = (1 + rung) * d_top - 8 * c  # 0, or -15 d: diagonal entries a0 +- c <= d
    unit = 2 * math.ulp(abs(a0) + c + d_top)
    for k in (-2, -1, 0, 1, 2):
        a = a0 + k * unit
        had = _hadamard_defect(a, c, seed=k, complex_=complex_)
        batch = torch.stack([corner, had, corner, had.mT.conj()]).reshape(2, 2, 64, 64)
        exact = Fraction(a) + 8 * Fraction(c)
        assert Fraction(_ladder_shift(batch, rung)) - exact == -k * Fraction(unit)
        bound = defect_max_eigenvalue_bound(batch.transpose(0, 1))
        assert Fraction(bound) >= max(exact, Fraction(d_top)), (rung, k, bound)


def test_defect_bound_of_zero_and_broadcast_defects():
    # D = 0 (exactly orthogonal Q): d = 0, the shift n eps; broadcast (stride-0) batch; the input
    # is left as it was
    zero = torch.zeros(64, 64, dtype=torch.float64)
    for d in (zero, zero.expand(3, 2, 64, 64), zero.to(torch.complex128).expand(5, 64, 64)):
        before = d.clone()
        bound = defect_max_eigenvalue_bound(d)
        assert 0 < bound <= 64 * EPS * 1.01
        assert torch.equal(d, before)


def test_defect_bound_far_from_semi_unitary_skips_or_exhausts_the_ladder(monkeypatch):
    # d above DEFECT_TOLERANCE: no Cholesky test at all; d small but lambda_max far above it (unit
    # columns, not orthogonal): the three tests fail, that matrix alone gets eigenvalues
    tests = []
    original = operator.shifted_cholesky_bound

    def counted(batch, shift):
        tests.append(len(batch))
        return original(batch, shift)

    monkeypatch.setattr(operator, "shifted_cholesky_bound", counted)
    had = _hadamard(64)
    far = 1e-3 * torch.eye(64, dtype=torch.float64) + 1e-3 * had  # d = 2e-3, lambda 9e-3
    assert Fraction(defect_max_eigenvalue_bound(far)) >= Fraction(1e-3) + 8 * Fraction(1e-3)
    assert tests == []
    skewed = 0.01 * (had - torch.diag(had.diagonal()))  # zero diagonal, lambda_max ~ 0.08
    batch = torch.stack([torch.zeros(64, 64, dtype=torch.float64), skewed])
    exact = float(torch.linalg.eigvalsh(skewed)[-1])
    assert exact <= defect_max_eigenvalue_bound(batch) <= exact * (1 + 1e-9)
    assert tests == [2, 1, 1]


def test_defect_bound_tolerance_is_exceeded_only_by_the_slack():
    # D = 2^-18 I: d = s = DEFECT_TOLERANCE, one rung; the bound is d + s plus the test's slack
    # (16 (n + 1) u trace(shift I - D) and the rest), so it exceeds lambda_max by DEFECT_TOLERANCE
    # and a hair: the tolerance is the rung's, the slack comes on top
    d = DEFECT_TOLERANCE * torch.eye(64, dtype=torch.float64)
    bound = defect_max_eigenvalue_bound(d)
    slack = 16 * 65 * EPS / 2 * 64 * DEFECT_TOLERANCE + 2 * DEFECT_TOLERANCE * EPS
    assert DEFECT_TOLERANCE < bound - DEFECT_TOLERANCE <= DEFECT_TOLERANCE + 2 * slack


# --- semi_unitary_spectral_bound: exact singular values from 64 rows on


def _hadamard_q(alpha: float, beta: float, seed: int, complex_: bool) -> torch.Tensor:
    """alpha H + beta I, scrambled: sigma_max = 8 alpha + beta exactly (alpha, beta >= 0)."""
    q = alpha * _hadamard(64) + beta * torch.eye(64, dtype=torch.float64)
    return _scramble(q, seed, complex_)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("shape", ["square", "tall", "wide"])
def test_semi_unitary_bound_is_above_the_exact_hadamard_norm(shape, precision, complex_):
    # Q = H / 8 + beta I and its rows scaled by 1 - gamma (contractive directions): sigma_max =
    # 1 + beta exactly; a batch with extra leading dims, float32 / complex64 copies (exact),
    # 16 zero rows or columns (tall: Q^H Q, wide: Q Q^H)
    cases = [(0.125, 0.0), (0.125, 2.0**-24), (0.125, 2.0**-20), (0.125 - 2.0**-24, 2.0**-21)]
    qs = [_hadamard_q(a, b, seed, complex_) for seed, (a, b) in enumerate(cases)]
    exact = max(8 * Fraction(a) + Fraction(b) for a, b in cases)
    q = torch.stack(qs).reshape(2, 2, 64, 64)
    if shape != "square":
        q = torch.cat([q, torch.zeros(2, 2, 16, 64, dtype=q.dtype)], dim=-2)
        q = q if shape == "tall" else q.mT
    if precision == "single":
        single = q.to(torch.complex64 if complex_ else torch.float32)
        assert torch.equal(single.to(q.dtype), q)
        q = single
    bound = semi_unitary_spectral_bound(q)
    assert Fraction(bound) >= exact
    assert bound <= float(exact) * (1 + 2.0**-19 + 1e-9)


@pytest.mark.parametrize(
    "scale",
    [1.0, 0.75, 0.5, 0.5 - 2.0**-30, 0.25, 2.0**-600, 2.0**-1074 * 2**20, 2.0**400, 1 + 2.0**-20],
)
@pytest.mark.parametrize("complex_", [False, True])
def test_semi_unitary_bound_of_scaled_orthogonal_q(scale, complex_):
    # scale H / 8 (exactly orthogonal times a power of two or so): sigma_max = scale exactly;
    # negative d (scale < 1, sigma^2 = 1/4 at 0.5 where 1 + lambda_max(D) cancels), zero D,
    # tiny and subnormal entries (D = -I), huge ones (D overflows): the eigen fallbacks
    q = _hadamard_q(scale / 8, 0.0, seed=7, complex_=complex_)
    assert all(Fraction(abs(float(x))) == Fraction(scale) / 8 for x in q.abs().flatten()[:64])
    bound = semi_unitary_spectral_bound(q)
    assert Fraction(bound) >= Fraction(scale)
    assert bound <= scale * (1 + 2.0**-19 + 1e-9) + 1e-300


def test_semi_unitary_bound_of_the_identity_of_64_rows():
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        eye = torch.eye(64, dtype=dtype)
        assert 1 <= semi_unitary_spectral_bound(eye) <= 1 + 1e-11
        assert 1 <= semi_unitary_spectral_bound(eye.expand(3, 64, 64)) <= 1 + 1e-11


def test_semi_unitary_bound_of_a_complex64_unitary_batch_with_a_bad_frequency():
    # the Cayley conv's shape (H, W // 2 + 1, C, C), complex64, 64 channels; one frequency
    # distorted off the diagonal of its defect (lambda_max ~ 1.6e-5, diagonal ~ 1e-7: its
    # Cholesky tests fail, it alone gets eigenvalues): above every exact norm
    gen = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.complex128))[0]
    had = _hadamard(64).to(q.dtype)
    q[1, 2] = q[1, 2] @ (torch.eye(64, dtype=q.dtype) + 1e-6 * (had - torch.diag(had.diagonal())))
    q = q.to(torch.complex64)
    exact = float(torch.linalg.svdvals(q.to(torch.complex128)).max())  # off by ~1e-15
    bound = semi_unitary_spectral_bound(q)
    assert exact * (1 + 1e-14) <= bound <= exact * (1 + 2.0**-19 + 1e-9)


def test_cayley_conv_of_64_channels_is_bounded_above_its_unitary():
    torch.manual_seed(0)
    layer = CayleyConv2d(64, 64, 3, (4, 4), dtype=torch.float32).eval()
    q = layer.unitary().detach().to(torch.complex128)
    assert q.shape[-1] >= DEFECT_CHOLESKY_MIN_SIZE
    exact = float(torch.linalg.svdvals(q).max())
    bound = layer.lipschitz_bound()
    assert exact * (1 + 1e-14) <= bound <= exact * (1 + 2.0**-19 + 1e-9)
