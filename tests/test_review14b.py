"""Review of the conv bound's Grams from the kernel's self-correlation (circular_norm): sound
against exact oracles at every geometry. Oracles: dense circular and padded matrices (float64
SVD), the symbols' singular values (the old symbol path), exact rational arithmetic (Fractions,
positive definiteness of b^2 I - M^T M) and 300-bit transforms (mpmath) for the rounding
argument of _gram_rounding entry by entry."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lipschitz import positive_definite
from torch import nn

from lipcert.bounds import padded_conv
from lipcert.bounds.conv import (
    grid_twiddles,
    kernel_symbol,
    polyphase_kernel,
    tap_pair_correlation,
)
from lipcert.bounds.operator import power_of_two_scale, rounding_safety
from lipcert.bounds.padded_conv import circular_norm, conv_operator_norm, module_geometry

SUBNORMAL = 2.0**-1074
TINY = 2.0**-1022
UNIT = 2.0**-53
KERNEL_SIZES = [(1, 1), (3, 1), (1, 3), (5, 3), (2, 2), (4, 2), (3, 3), (2, 5)]


# ---------------------------------------------------------------------------------------------
# Oracles


def _dense_circular(kernel: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> list:
    """The stride-``stride`` circular convolution's matrix per group, built from its definition
    y[o, p] = sum_{i, a} K[o, i, a] x[i, (p s + a) mod n] (taps wrap as often as they must)."""
    groups, c_out, c_in, kh, kw = kernel.shape
    (n1, n2), (s1, s2) = grid, stride
    m1, m2 = n1 // s1, n2 // s2
    k = kernel.numpy()
    mats = []
    for g in range(groups):
        matrix = np.zeros((c_out, m1, m2, c_in, n1, n2))
        for p1 in range(m1):
            for p2 in range(m2):
                for a1 in range(kh):
                    for a2 in range(kw):
                        column = (p1 * s1 + a1) % n1, (p2 * s2 + a2) % n2
                        matrix[:, p1, p2, :, column[0], column[1]] += k[g, :, :, a1, a2]
        mats.append(matrix.reshape(c_out * m1 * m2, c_in * n1 * n2))
    return mats


def _exact_circular(kernel: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> float:
    return max(float(np.linalg.norm(m, 2)) for m in _dense_circular(kernel, grid, stride))


def _symbol_norm(kernel: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> float:
    """max over the torus' frequencies of sigma_1 of the polyphase symbol (FFT, SVD): what the
    old code bounded by forming the symbols and their Grams."""
    groups, c_out, c_in, kh, kw = kernel.shape
    poly = polyphase_kernel(kernel.reshape(groups * c_out, c_in, kh, kw), stride)
    torus = (grid[0] // stride[0], grid[1] // stride[1])
    # taps past the torus wrap around: fold them before the FFT
    folded = poly.new_zeros(*poly.shape[:2], *torus)
    for b1 in range(poly.shape[-2]):
        for b2 in range(poly.shape[-1]):
            folded[..., b1 % torus[0], b2 % torus[1]] += poly[..., b1, b2]
    symbols = torch.fft.fft2(folded).reshape(groups, c_out, -1, *torus)
    return float(torch.linalg.svdvals(symbols.permute(0, 3, 4, 1, 2))[..., 0].max())


def _conv_matrix(conv: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The convolution's matrix (float64, no bias) on inputs of ``shape``: every basis input."""
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    return conv(basis).reshape(size, -1).T


def _random_kernel(rng: random.Random, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    k = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "pm1":  # exact cancellation: corr(d) = 0 at offsets where |K| correlates
        k = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    elif kind == "const":
        k = torch.ones(shape, dtype=torch.float64)
    elif kind == "mixed":  # one kernel, 2^60 apart: the scaled products underflow partly
        k = k * torch.pow(2.0, torch.randint(-60, 5, shape, generator=gen).double())
    elif kind == "cancel" and shape[1] > 1:  # two output channels nearly opposite
        k[:, 1] = -k[:, 0] + 2.0**-30 * torch.randn(k[:, 0].shape, generator=gen).double()
    elif kind == "float32":
        k = k.float().double()
    elif kind == "bfloat16":
        k = k.bfloat16().double()
    elif kind == "float16":
        k = k.half().double()
    return k


KINDS = ["gauss", "pm1", "const", "mixed", "cancel", "float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------
# The rounding argument, entry by entry


def _computed_grams(kernel: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]):
    """circular_norm's steps: the scaled polyphase kernel (smaller Gram's side), its computed
    self-correlation and the computed Grams at the torus' half-spectrum frequencies."""
    groups, c_out, c_in, kh, kw = kernel.shape
    poly = polyphase_kernel(kernel.reshape(groups * c_out, c_in, kh, kw), stride)
    poly = (poly / power_of_two_scale(poly)).reshape(groups, c_out, *poly.shape[1:])
    if poly.shape[2] > c_out:
        poly = poly.transpose(1, 2)
    bh, bw = poly.shape[-2:]
    corr = tap_pair_correlation(poly)
    n = corr.shape[1]
    flat = corr.reshape(groups * n, n, *corr.shape[-2:])
    torus = (grid[0] // stride[0], grid[1] // stride[1])
    twiddles = grid_twiddles(corr.shape[-2:], torus, flat, origin=(bh - 1, bw - 1))
    grams = kernel_symbol(flat, twiddles).reshape(-1, groups, n, n)
    return poly, corr, grams, torus


def _half_spectrum(torus: tuple[int, int]) -> list[tuple[int, int]]:
    """grid_twiddles' frequencies, in its order."""
    n1, n2 = torus
    freqs = np.indices((n1, n2 // 2 + 1)).reshape(2, -1).T
    self_conjugate = (freqs[:, 1] == 0) | (2 * freqs[:, 1] == n2)
    return freqs[~self_conjugate | (freqs[:, 0] <= (-freqs[:, 0]) % n1)].tolist()


def _mp(value: Fraction) -> mpmath.mpf:
    return mpmath.mpf(value.numerator) / value.denominator


def _lower_mirrored_frobenius(error: list[list[mpmath.mpc]]) -> mpmath.mpf:
    """Frobenius norm of the error of a computed Gram as LAPACK reads it (its lower triangle
    mirrored, the diagonal's real part) from its entries' errors against the exact Gram."""
    lower = sum(2 * abs(row[j]) ** 2 for i, row in enumerate(error) for j in range(i))
    return mpmath.sqrt(lower + sum(row[i].real ** 2 for i, row in enumerate(error)))


def _gram_entry_excess(kernel, grid, stride) -> tuple[float, float]:
    """Largest |computed - exact| / (per-entry bound of _gram_rounding's docstring, without its
    doubling) over the correlation's and the Grams' entries, and largest Frobenius norm of
    (the Gram as LAPACK reads it: its lower triangle mirrored) - exact over _gram_rounding:
    both must stay below 1. The exact correlation in Fractions, the transform at 300 bits."""
    poly, corr, grams, torus = _computed_grams(kernel, grid, stride)
    groups, rows, n, bh, bw = poly.shape
    offsets = [(d1, d2) for d1 in range(1 - bh, bh) for d2 in range(1 - bw, bw)]
    gamma_n = rounding_safety(torch.float64, rows + bh * bw) - 1
    gamma_t = rounding_safety(torch.float64, len(offsets) + 1) - 1
    underflow = (rows + bh * bw + len(offsets)) * TINY
    taps = [[[[[Fraction(v) for v in r] for r in a] for a in b] for b in c] for c in poly.tolist()]
    worst, errors = 0.0, {}
    with mpmath.workprec(300):
        for g in range(groups):
            k = taps[g]
            sums = [
                [sum(abs(v) for r in k[o][i] for v in r) for i in range(n)] for o in range(rows)
            ]
            for i in range(n):
                for j in range(n):
                    btb = sum(sums[o][i] * sums[o][j] for o in range(rows))
                    exact, absolute = {}, {}
                    for d1, d2 in offsets:
                        terms = [k[o][i][u1 + d1][u2 + d2] * k[o][j][u1][u2]
                                 for o in range(rows) for u1 in range(bh) for u2 in range(bw)
                                 if 0 <= u1 + d1 < bh and 0 <= u2 + d2 < bw]  # fmt: skip
                        exact[d1, d2] = sum(terms, Fraction(0))
                        absolute[d1, d2] = sum((abs(t) for t in terms), Fraction(0))
                        got = Fraction(float(corr[g, i, j, d1 + bh - 1, d2 + bw - 1]))
                        allowed = gamma_n * float(absolute[d1, d2]) + underflow
                        worst = max(worst, float(abs(got - exact[d1, d2])) / allowed)
                    allowed = (gamma_n + gamma_t * (1 + gamma_n)) * _mp(btb) + underflow
                    for f, (k1, k2) in enumerate(_half_spectrum(torus)):
                        value = mpmath.mpc(0)
                        for (d1, d2), c in exact.items():
                            if c:
                                turns = (
                                    mpmath.mpf(d1 * k1) / torus[0] + mpmath.mpf(d2 * k2) / torus[1]
                                )
                                value += _mp(c) * mpmath.expjpi(-2 * turns)
                        got = complex(grams[f, g, i, j])
                        errors[f, g, i, j] = mpmath.mpc(got.real, got.imag) - value
                        worst = max(worst, float(abs(errors[f, g, i, j]) / allowed))
        frobenius = max(
            _lower_mirrored_frobenius([[errors[f, g, i, j] for j in range(n)] for i in range(n)])
            for f in range(grams.shape[0])
            for g in range(groups)
        )
    flat = corr.reshape(groups * n, n, *corr.shape[-2:])
    return worst, float(frobenius) / padded_conv._gram_rounding(poly, flat)


@pytest.mark.parametrize("seed", range(10))
def test_gram_entries_are_within_the_rounding_argument(seed):
    """The docstring of _gram_rounding, checked entry by entry against exact arithmetic: each
    correlation entry within gamma_N times the correlation of |K| (N = rows + taps: the product
    over the channels, then index_add_ over the tap pairs), each Gram entry within
    (gamma_N + gamma_T (1 + gamma_N)) (B^T B)_ij (the transform over the offsets, the twiddles'
    own error included), both Gram sides, strides, groups, tori smaller than the offsets (they
    alias), cancelling, mixed-magnitude and subnormal kernels. Measured: <= 2% of the bound."""
    rng = random.Random(1000 + seed)
    for _ in range(3):
        groups = rng.choice([1, 2])
        c_out, c_in = rng.randint(1, 3), rng.randint(1, 3)
        kh, kw = rng.choice(KERNEL_SIZES)
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        grid = (stride[0] * rng.randint(1, 4), stride[1] * rng.randint(1, 4))
        kind = rng.choice([*KINDS, "subnormal"])
        if kind == "subnormal":
            shape = (groups, c_out, c_in, kh, kw)
            kernel = torch.tensor([rng.randint(-3, 3) for _ in range(math.prod(shape))])
            kernel = kernel.double().reshape(shape) * SUBNORMAL
        else:
            kernel = _random_kernel(rng, (groups, c_out, c_in, kh, kw), kind)
        entries, frobenius = _gram_entry_excess(kernel, grid, stride)
        assert entries < 0.25, (kernel.shape, grid, stride, kind)
        assert frobenius < 0.25, (kernel.shape, grid, stride, kind)


# ---------------------------------------------------------------------------------------------
# circular_norm against dense matrices and the symbols


@pytest.mark.parametrize("seed", range(16))
def test_circular_norm_covers_the_dense_circular_convolution(seed):
    """circular_norm >= the exact norm of the circular convolution's matrix (built from its
    definition, taps wrapping as often as the torus makes them), and within 1e-9 of it: tiny
    tori (grid below 2k - 1: offsets alias), strides 1-3, groups, non-square kernels, both Gram
    sides with 9 or 12 rows (the Cholesky test), every kernel family, 2^+-1000 magnitudes."""
    rng = random.Random(seed)
    for _ in range(8):
        groups = rng.choice([1, 1, 2, 3])
        c_out, c_in = rng.choice([1, 2, 3, 9, 12]), rng.choice([1, 2, 3, 9, 12])
        kh, kw = rng.choice(KERNEL_SIZES)
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        grid = (stride[0] * rng.randint(1, 5), stride[1] * rng.randint(1, 5))
        kernel = _random_kernel(rng, (groups, c_out, c_in, kh, kw), rng.choice(KINDS))
        magnitude = rng.choice([1.0, 1.0, 2.0**1000, 2.0**-1000])
        exact = _exact_circular(kernel, grid, stride) * magnitude
        bound = circular_norm(kernel * magnitude, grid, stride)
        context = (kernel.shape, grid, stride, magnitude)
        assert exact <= bound <= exact * (1 + 1e-9) + 1e-6 * magnitude, context


@pytest.mark.parametrize(
    ("groups", "c_out", "c_in", "kernel_size", "stride", "grid"),
    [
        (1, 32, 16, (3, 3), (1, 1), (12, 10)),
        (1, 16, 32, (3, 3), (2, 2), (12, 10)),
        (4, 8, 8, (5, 3), (1, 2), (9, 8)),
        (2, 20, 9, (4, 4), (2, 1), (8, 9)),
        (1, 24, 24, (1, 1), (1, 1), (7, 5)),
        (1, 8, 64, (3, 3), (3, 3), (9, 9)),
    ],
)
def test_circular_norm_matches_the_symbols_singular_values(
    groups, c_out, c_in, kernel_size, stride, grid
):
    """Against the symbols' largest singular values (the old symbol path, by FFT and SVD) at
    sizes too large for dense matrices: above them, within 1e-9."""
    kernel = _random_kernel(
        random.Random(c_out + c_in), (groups, c_out, c_in, *kernel_size), "gauss"
    )
    exact = _symbol_norm(kernel, grid, stride)
    assert exact <= circular_norm(kernel, grid, stride) <= exact * (1 + 1e-9)


def test_chunked_frequencies_give_the_same_bound(monkeypatch):
    """Frequencies split into chunks (one Gram batch each, some of them too small for the
    Cholesky test): the same maximum as in one batch, above the exact norm."""
    kernel = _random_kernel(random.Random(3), (2, 9, 10, 3, 3), "gauss")
    grid, stride = (6, 7), (1, 1)
    whole = circular_norm(kernel, grid, stride)
    exact = _exact_circular(kernel, grid, stride)
    for elements in (1, 9 * 9 * 2 * 3, 9 * 9 * 2 * 7):
        monkeypatch.setattr(padded_conv, "SYMBOL_CHUNK_ELEMENTS", elements)
        chunked = circular_norm(kernel, grid, stride)
        assert exact <= chunked == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("channels", [3, 9, 16])
def test_a_flat_spectrum_ties_every_frequency(channels):
    """One tap holding an orthogonal matrix: every frequency's Gram is I (all tied, and tied
    with the Cholesky test's shift, which then fails everywhere). Norm exactly 1."""
    gen = torch.Generator().manual_seed(channels)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
    kernel = torch.zeros(1, channels, channels, 3, 3, dtype=torch.float64)
    kernel[0, :, :, 2, 1] = q
    bound = circular_norm(kernel, (5, 6), (1, 1))
    assert 1 - 1e-12 <= bound <= 1 + 1e-9


# ---------------------------------------------------------------------------------------------
# Extreme magnitudes, exactly


def _above_smaller_gram(level: Fraction, m: list[list[Fraction]]) -> bool:
    """Whether level I - (M^T M or M M^T, the smaller) is positive definite, exactly."""
    if len(m) < len(m[0]):
        m = [list(column) for column in zip(*m, strict=True)]
    cols = range(len(m[0]))
    shifted = [[(level if i == j else 0) - sum(row[i] * row[j] for row in m) for j in cols]
               for i in cols]  # fmt: skip
    return positive_definite(shifted)


def _nonnegative_norm_bounded(kernel: torch.Tensor, stride: tuple[int, int], bound: float) -> bool:
    """Whether ``bound`` >= the stride-``stride`` circular norm of a nonnegative kernel on every
    torus, exactly: its polyphase symbol has |S(w)| <= S(0) = M entrywise, so that norm is
    sigma_1(M), and b^2 I - M^T M is positive definite in rational arithmetic."""
    groups, c_out, c_in, kh, kw = kernel.shape
    kernel = polyphase_kernel(kernel.reshape(groups * c_out, c_in, kh, kw), stride)  # exact
    sums = [[sum((Fraction(v) for v in taps.flatten().tolist()), Fraction(0)) for taps in row]
            for row in kernel]  # fmt: skip
    return all(
        _above_smaller_gram(Fraction(bound) ** 2, sums[g * c_out : (g + 1) * c_out])
        for g in range(groups)
    )


#: Exponent ranges of the taps, and channels: the widest ranges make slow rationals at 9 x 9.
MAGNITUDE_CASES = [
    (exponents, channels)
    for exponents in [(-1074, -1074), (-1074, -1060), (-1074, -1000), (-1074, 0), (-1000, -1000),
                      (-1100, 3), (-60, 0), (1000, 1000), (900, 1010)]
    for channels in [(1, 1), (3, 2), (9, 9), (2, 10)]
    if channels != (9, 9) or exponents[1] - exponents[0] < 200
]  # fmt: skip


@pytest.mark.parametrize(("exponents", "channels"), MAGNITUDE_CASES)
def test_extreme_and_mixed_magnitudes_are_bounded_exactly(exponents, channels):
    """Nonnegative kernels of integer multiples of 2^e with e drawn per tap in ``exponents``
    (subnormal taps, products that underflow after the power-of-two scaling, a bound that
    lands in the subnormal range and is rounded there): the bound is checked in exact rational
    arithmetic, on a torus where the frequency 0 is the maximum."""
    rng = random.Random(hash((exponents, channels)) % 2**32)
    shape = (1, *channels, 3, 2)
    values = [math.ldexp(rng.randint(0, 7), rng.randint(*exponents))
              for _ in range(math.prod(shape))]  # fmt: skip
    kernel = torch.tensor(values, dtype=torch.float64).reshape(shape)
    for grid, stride in (((4, 5), (1, 1)), ((2, 2), (2, 1)), ((1, 1), (1, 1))):
        bound = circular_norm(kernel, grid, stride)
        assert _nonnegative_norm_bounded(kernel, stride, bound), (grid, stride, bound)


def _gram_level_bounded(kernel: torch.Tensor, grid: tuple[int, int], bound: float) -> bool:
    """Whether ``bound`` >= the stride-1 circular norm on a torus of sides 1 or 2, exactly: there
    every frequency is 0 or pi per axis, the symbol S(w) = sum_a K_a (-1)^(w.a / pi) is rational,
    and b^2 I - S^T S must be positive definite at each one."""
    groups, c_out, c_in, kh, kw = kernel.shape
    taps = [[[[[Fraction(v) for v in r] for r in a] for a in b] for b in c]
            for c in kernel.tolist()]  # fmt: skip
    for g, k1, k2 in itertools.product(range(groups), range(grid[0]), range(grid[1])):
        symbol = [[sum((taps[g][o][i][a1][a2] * (-1) ** (a1 * k1 + a2 * k2)
                        for a1 in range(kh) for a2 in range(kw)), Fraction(0))
                   for i in range(c_in)] for o in range(c_out)]  # fmt: skip
        if not _above_smaller_gram(Fraction(bound) ** 2, symbol):
            return False
    return True


@pytest.mark.parametrize(
    ("groups", "c_out", "c_in"),
    [(1, 1, 1), (1, 4, 1), (1, 1, 4), (3, 9, 9), (1, 9, 12), (1, 12, 9)],
)
@pytest.mark.parametrize("grid", [(1, 1), (2, 1), (2, 2)])
def test_cancelling_kernels_are_bounded_exactly(groups, c_out, c_in, grid):
    """Taps of size 1-2 whose sums over each parity class cancel to ~2^-20: the symbols, tiny at
    every frequency of a torus of sides 1 or 2, come out of a correlation and a transform that
    cancel too, their rounding (~u ||B^T B||) far above u times the Gram. Only _gram_rounding
    covers it: checked exactly (rational symbols on such tori), the Cholesky test included
    (9 rows or more, more than two Grams)."""
    gen = torch.Generator().manual_seed(groups * 100 + c_out * 10 + c_in + grid[1])
    kernel = 1 + torch.rand(groups, c_out, c_in, 4, 4, generator=gen, dtype=torch.float64)
    kernel *= torch.randint(0, 2, kernel.shape, generator=gen).double() * 2 - 1
    for r1 in range(2):
        for r2 in range(2):
            others = kernel[..., r1::2, r2::2].sum(dim=(-2, -1)) - kernel[..., r1, r2]
            small = torch.rand(others.shape, generator=gen, dtype=torch.float64) * 2.0**-20
            kernel[..., r1, r2] = -others + small
    bound = circular_norm(kernel, grid, (1, 1))
    assert _gram_level_bounded(kernel, grid, bound)
    assert bound <= 1e-4  # the symbols are ~2^-20; sqrt of the rounding term, ~1e-5, on top


def test_all_subnormal_constant_kernel_rounds_up():
    """3 x 3 taps of 2^-1074: the norm 9 * 2^-1074 is a float; the bound, rounded in the
    subnormal range, must not fall on or below the float below it."""
    kernel = torch.full((1, 1, 1, 3, 3), SUBNORMAL, dtype=torch.float64)
    assert circular_norm(kernel, (5, 5), (1, 1)) >= 9 * SUBNORMAL


# ---------------------------------------------------------------------------------------------
# conv_operator_norm on modules


@pytest.mark.parametrize("seed", range(12))
def test_conv_operator_norm_covers_the_dense_matrix_at_random_geometries(seed):
    """Random 1-D / 2-D modules: groups, strides 1-3, dilations, non-square and even kernels,
    non-square inputs, every padding mode, channel counts reaching the Cholesky test, weights
    stored in float32 / bfloat16 / float16 or scaled by 2^+-1000: never below the exact norm."""
    rng = random.Random(100 + seed)
    for _ in range(8):
        axes = rng.choice([1, 2, 2])
        groups = rng.choice([1, 1, 2])
        c_in_g, c_out_g = rng.choice([1, 3, 9]), rng.choice([1, 3, 9])
        if axes == 2:
            kernel_size = rng.choice(KERNEL_SIZES)
            stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 2),) * 2
            size = (rng.randint(2, 7), rng.randint(2, 7))
        else:
            kernel_size, stride, dilation = (
                (rng.randint(1, 5),),
                rng.randint(1, 3),
                rng.randint(1, 3),
            )
            size = (rng.randint(3, 12),)
        mode = rng.choice(["zeros", "zeros", "circular", "reflect", "replicate"])
        padding = rng.choice([0, 1, 2])
        conv = (nn.Conv1d if axes == 1 else nn.Conv2d)(
            c_in_g * groups, c_out_g * groups, kernel_size, stride, padding, dilation, groups,
            bias=False, padding_mode=mode,
        ).double().requires_grad_(False)  # fmt: skip
        kind = rng.choice(KINDS)
        conv.weight.copy_(_random_kernel(rng, tuple(conv.weight.shape), kind))
        try:
            exact = float(
                torch.linalg.matrix_norm(_conv_matrix(conv, (conv.in_channels, *size)), 2)
            )
        except RuntimeError:  # torch refuses the geometry (input below the kernel, padding)
            continue
        stored = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        weight = conv.weight.to(stored.get(kind, torch.float64))
        magnitude = rng.choice([1.0, 1.0, 2.0**-1000]) if kind not in stored else 1.0
        bound = conv_operator_norm(weight * magnitude, module_geometry(conv, size))
        assert bound >= exact * magnitude, (conv, size, kind, magnitude)


def test_old_and_new_bounds_agree_on_module_geometries():
    """The zero-padded bound against the symbols' singular values on its torus (what the old
    code bounded), for modules on the Cholesky test's side of 8 rows."""
    for seed, (c_in, c_out, kernel_size, stride) in enumerate(
        [(16, 8, 3, 1), (8, 16, (5, 3), 2), (3, 64, 3, 2), (32, 32, (1, 3), 1)]
    ):
        torch.manual_seed(seed)
        conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding=1, bias=False).double()
        geometry = module_geometry(conv, (9, 10))
        kernel = conv.weight.detach()[None]
        pads, size, stride = geometry.pads, geometry.input_size, geometry.stride
        axes = zip(size, pads, kernel.shape[-2:], stride, strict=True)
        grid = tuple(padded_conv._torus_size(n, lo, hi, k, s) for n, (lo, hi), k, s in axes)
        exact = _symbol_norm(kernel, grid, geometry.stride)
        assert exact <= conv_operator_norm(conv.weight, geometry) <= exact * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize("seed", range(4))
def test_tap_pair_correlation_is_the_self_correlation(seed):
    """Integer kernels (every product and sum exact in float64): the correlation equals its
    definition sum_o sum_u K[o, i, u + d] K[o, j, u] exactly, groups and rectangular taps
    included, and equals the 'valid' cross-correlation of the kernel with itself."""
    rng = random.Random(seed)
    groups, c_out, c_in = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4)
    kh, kw = rng.choice(KERNEL_SIZES)
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randint(-50, 50, (groups, c_out, c_in, kh, kw), generator=gen).double()
    corr = tap_pair_correlation(kernel)
    k = kernel.long().tolist()
    for g in range(groups):
        for i in range(c_in):
            for j in range(c_in):
                for d1 in range(1 - kh, kh):
                    for d2 in range(1 - kw, kw):
                        exact = sum(k[g][o][i][u1 + d1][u2 + d2] * k[g][o][j][u1][u2]
                                    for o in range(c_out) for u1 in range(kh) for u2 in range(kw)
                                    if 0 <= u1 + d1 < kh and 0 <= u2 + d2 < kw)  # fmt: skip
                        assert corr[g, i, j, d1 + kh - 1, d2 + kw - 1] == exact
        # the same through a convolution routine: (c_in, c_out, k) against itself, zero-padded
        x = kernel[g].transpose(0, 1)  # (c_in, c_out, kh, kw)
        via_conv = F.conv2d(F.pad(x, (kw - 1, kw - 1, kh - 1, kh - 1)), x)  # (c_in, c_in, ...)
        assert torch.allclose(corr[g], via_conv, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_grid_twiddles_from_an_origin_are_the_exact_angles(seed):
    """Taps numbered from an origin (negative ones included): each twiddle within 32 units of
    roundoff of cos / sin of 2 pi (d . k mod n) / n at 100 bits, and taps n apart (the same
    phase modulo the grid) bit for bit equal."""
    rng = random.Random(seed)
    size = (rng.randint(1, 9), rng.randint(1, 9))
    origin = (rng.randint(0, size[0]), rng.randint(0, size[1]))
    grid = (rng.randint(1, 7), rng.randint(1, 7))
    twiddles = grid_twiddles(size, grid, torch.zeros(1, dtype=torch.float64), origin)
    taps = (np.indices(size).reshape(2, -1).T - np.array(origin)).tolist()
    freqs = _half_spectrum(grid)
    assert twiddles.shape == (2, len(taps), len(freqs))
    with mpmath.workprec(100):
        for t, (d1, d2) in enumerate(taps):
            for f, (k1, k2) in enumerate(freqs):
                turns = Fraction(d1 * k1, grid[0]) + Fraction(d2 * k2, grid[1])
                angle = 2 * mpmath.pi * _mp(turns - math.floor(turns))
                assert abs(float(twiddles[0, t, f]) - mpmath.cos(angle)) <= 32 * UNIT
                assert abs(float(twiddles[1, t, f]) - mpmath.sin(angle)) <= 32 * UNIT
    by_tap = {tuple(tap): t for t, tap in enumerate(taps)}
    for (d1, d2), t in by_tap.items():
        for other in ((d1 + grid[0], d2), (d1, d2 - grid[1])):
            if other in by_tap:
                assert torch.equal(twiddles[:, t], twiddles[:, by_tap[other]])


# ---------------------------------------------------------------------------------------------
# Findings


@pytest.mark.parametrize("value", [math.inf, -math.inf])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_an_infinite_weight_has_an_infinite_bound(value, padding_mode):
    """An infinite tap makes every Gram NaN, which max() dropped, leaving the maximum's start
    -inf: -inf plus the infinite rounding term gave a NaN bound (the symbol path gave inf).
    The graph bound refuses such weights first; conv_operator_norm must not return NaN."""
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False, padding_mode=padding_mode).double()
    weight = conv.weight.detach().clone()
    weight[0, 1, 2, 0] = value
    assert conv_operator_norm(weight, module_geometry(conv, (5, 6))) == math.inf
