"""Tight, sound l2 operator norm of a 1-D or 2-D convolution at a known input size.

:func:`~lipcert.bounds.conv.conv2d_operator_bound` holds at every input size, so it must bound
the supremum of the symbol over all frequencies (a grid plus a Bernstein correction, ~2% loose).
When the input size is known, the convolution is a *submatrix* of one circular convolution on a
finite torus, whose norm is a maximum over that torus' frequencies, computed exactly.

Zero padding
------------
Per axis, let the input have n pixels, the padding (lo, hi), m = n + lo + hi, the dilated kernel
span D = d (k - 1) + 1 and the stride s. Output o reads the padded positions o s + d a (a < k), all
in [0, m); the pixels sit at [lo, lo + n), zeros elsewhere. Wrap the padded positions onto a torus
of size N (u -> u mod N). For N >= n + lo the pixels keep distinct places, and for N >= n + hi the
positions [N, m) land on [0, m - N), inside the left padding: every output still reads exactly its
pixels, with the same taps. For N >= m - D + 1 the outputs o s, o < (m - D) / s + 1, are distinct
mod N, and for N a multiple of s they are outputs of the stride-s circular convolution on the
torus. So the zero-padded convolution is R C E: E embeds the input isometrically, C is that
circular convolution, R keeps distinct outputs; its norm is at most ||C||. The smallest N
meeting the conditions is used (for a 3 x 3 "same" convolution N = n + 1; a larger N is as sound
and measured no tighter).

Other padding modes
-------------------
* circular: output o reads x[(o s - lo + d a) mod n] exactly, i.e. row (o s - lo) mod n of the
  circular convolution on the input's own n-torus (polyphase on the (n / s)-torus when s | n,
  all those rows sharing one phase; stride 1 otherwise). Padding beyond (D - 1) / 2 can repeat a
  row; a matrix whose rows repeat at most r times has norm at most sqrt(r) times the norm of its
  distinct rows, so the bound carries sqrt(max repeats) per axis.
* reflect / replicate: the padded input is P x with P a 0/1 matrix with one 1 a row, so
  P^T P = diag(copies of each pixel) and ||P|| = sqrt(max copies) per axis (2 for reflect
  unless the input is shorter than twice the padding, 1 + pad for replicate's edge pixel). The
  bound is that factor times the "valid" convolution of the padded input (a zero-padding case
  with no padding): sound, loose by up to that factor.

Rounding
--------
The weight is read exactly in float64. sigma_1(S(w))^2 is the largest eigenvalue of the symbol's
smaller Gram, S^H S or S S^H, which is the transform of the kernel's self-correlation over the
other side's channels, G(w) = sum_d corr(d) e^{-i w.d} (up to a transpose): one matrix product
over the pairs of taps gives corr (:func:`~lipcert.bounds.conv.tap_pair_correlation`), one
complex product over the offsets the Grams at every frequency (no FFT; for the LMT CNN's conv2,
9 offsets of 32 x 32 instead of 34 products of 32 x 64 symbols). The rounding of both, entrywise
a multiple of the correlation of |K| whose sum over the offsets is B^T B with B the kernels' tap
sums, is added by Weyl's inequality (:func:`_gram_rounding`). The largest eigenvalue over the
frequencies: LAPACK's symmetric eigenvalues of the two Grams of largest Frobenius norm (with
their backward error), and for the others a Cholesky factorization proving each below that
(:func:`~lipcert.bounds.operator.gram_max_eigenvalue_bound`).

Measured
--------
bound / exact, never below 1 (tests/test_padded_conv.py against dense matrices). On design.md §6's
benchmark convolutions, 3 x 3 "same", torch's default init, 3 seeds (``benchmarks/
conv_tightness.py``; "exact" from Lanczos, a lower bound, so these over-estimate the ratio):
3 -> 64 and 64 -> 64 at 32 x 32: <= 1.0016; 256 -> 128 and 128 -> 128 at 16 x 16: <= 1.0055
(seeds 7, 11, 23 in the twentieth session's review: <= 1.0017 at 32 x 32, <= 1.0068 at 16 x 16).
What is left is the zero-padding deficit: a kernel whose gain peaks at frequency 0 (a low-pass
filter) reaches it on every torus, but on n zero-padded pixels only up to cos(pi / (n + 1)) per
axis; for the constant 3 x 3 kernel the ratio is 1.023 at 16 x 16 and 1.006 at 32 x 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipcert.bounds.conv import (
    grid_twiddles,
    kernel_symbol,
    polyphase_kernel,
    tap_pair_correlation,
)
from lipcert.bounds.operator import gram_max_eigenvalue_bound, power_of_two_scale, rounding_safety

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
#: Symbol entries (frequencies x groups x c_out x c_in) formed at once: a memory cap.
SYMBOL_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution meets its input, per spatial axis (1 or 2 axes)."""

    input_size: tuple[int, ...]  # n per axis
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # (before, after) per axis
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        axes = len(self.input_size)
        fields = (self.stride, self.dilation, self.pads)
        if axes not in (1, 2) or any(len(f) != axes for f in fields):
            raise ValueError(f"a 1-D or 2-D geometry needs one entry per axis, got {self}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self}")


def conv_geometry(
    kernel_size: tuple[int, ...],
    input_size: tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """The geometry of a convolution, with torch's ``Conv1d``/``Conv2d`` argument conventions.

    ``padding="same"`` pads d (k - 1) per axis, the odd pixel after (as torch does).
    """
    axes = len(kernel_size)

    def per_axis(value: int | tuple[int, ...]) -> tuple[int, ...]:
        return (value,) * axes if isinstance(value, int) else tuple(value)

    dilation = per_axis(dilation)
    if isinstance(padding, str):  # "valid" or "same"
        totals = [0 if padding == "valid" else d * (k - 1)
                  for d, k in zip(dilation, kernel_size, strict=True)]  # fmt: skip
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in per_axis(padding))
    size = tuple(int(n) for n in input_size)
    return ConvGeometry(size, per_axis(stride), dilation, pads, groups, padding_mode)


def module_geometry(conv: nn.Conv1d | nn.Conv2d, input_size: tuple[int, ...]) -> ConvGeometry:
    """The geometry of ``conv`` on inputs of spatial size ``input_size``: the padding its forward
    applies. With a padding mode other than zeros that is ``_reversed_padding_repeated_twice``,
    fixed when the module was built (``padding`` changed afterwards is not read)."""
    geometry = conv_geometry(
        conv.kernel_size, input_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        conv.padding_mode,
    )  # fmt: skip
    if conv.padding_mode == "zeros":
        return geometry
    return replace(geometry, pads=forward_pads(conv))


def forward_pads(conv: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], ...]:
    """(before, after) per spatial axis that ``conv``'s forward pads with a non-zeros mode: torch's
    ``_reversed_padding_repeated_twice`` lists them last axis first."""
    reversed_pads = conv._reversed_padding_repeated_twice
    pairs = [tuple(reversed_pads[i : i + 2]) for i in range(0, len(reversed_pads), 2)]
    return tuple(reversed(pairs))


def conv_operator_norm(weight: Tensor, geometry: ConvGeometry) -> float:
    """Sound upper bound of the l2 operator norm of the convolution with ``weight``.

    ``weight``: (c_out, c_in / groups, k) or (c_out, c_in / groups, kh, kw), as in nn.Conv1d/2d.
    Within float64 rounding of the exact norm of a circular convolution that contains it (module
    docstring); the bias does not matter. NaN for a weight holding a NaN, inf for one holding an
    inf (LAPACK's eigenvalues fail on them, so they get no further).
    """
    if weight.dim() != len(geometry.input_size) + 2:
        raise ValueError(
            f"a weight of shape {tuple(weight.shape)} does not fit a {geometry} convolution"
        )
    if not bool(torch.isfinite(weight).all()):
        return math.nan if bool(weight.isnan().any()) else math.inf
    geometry = _as_2d_geometry(geometry)
    kernel = dilated_kernel(_as_2d(weight.detach().double()), geometry.dilation)
    kernel = kernel.reshape(geometry.groups, -1, *kernel.shape[1:])  # (groups, c_out_g, ...)
    if geometry.padding_mode == "zeros":
        return _zero_padded_norm(kernel, geometry)
    if geometry.padding_mode == "circular":
        return _circular_padded_norm(kernel, geometry)
    copies = [max_copies(n, pad, geometry.padding_mode)
              for n, pad in zip(geometry.input_size, geometry.pads, strict=True)]  # fmt: skip
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(geometry.input_size, geometry.pads,
                                                      strict=True))  # fmt: skip
    valid = ConvGeometry(padded, geometry.stride, (1, 1), ((0, 0), (0, 0)), geometry.groups)
    return math.sqrt(math.prod(copies)) * _zero_padded_norm(kernel, valid)


def _as_2d(weight: Tensor) -> Tensor:
    return weight.unsqueeze(-2) if weight.dim() == 3 else weight  # a 1-D kernel is 1 x k


def _as_2d_geometry(geometry: ConvGeometry) -> ConvGeometry:
    if len(geometry.input_size) == 2:
        return geometry
    return ConvGeometry(
        (1, *geometry.input_size),
        (1, *geometry.stride),
        (1, *geometry.dilation),
        ((0, 0), *geometry.pads),
        geometry.groups,
        geometry.padding_mode,
    )


def dilated_kernel(weight: Tensor, dilation: tuple[int, int]) -> Tensor:
    """The kernel with d - 1 zeros between taps: (c_out, c_in_g, d1 (kh-1) + 1, d2 (kw-1) + 1)."""
    (d1, d2), (kh, kw) = dilation, weight.shape[-2:]
    out = weight.new_zeros((*weight.shape[:2], d1 * (kh - 1) + 1, d2 * (kw - 1) + 1))
    out[..., ::d1, ::d2] = weight
    return out


def _zero_padded_norm(kernel: Tensor, geometry: ConvGeometry) -> float:
    grid = tuple(
        _torus_size(n, lo, hi, span, s)
        for n, (lo, hi), span, s in zip(
            geometry.input_size, geometry.pads, kernel.shape[-2:], geometry.stride, strict=True
        )
    )
    return circular_norm(kernel, grid, geometry.stride)


def _torus_size(n: int, lo: int, hi: int, span: int, stride: int) -> int:
    """Smallest multiple of ``stride`` that is >= n + max(lo, hi) and >= m - span + 1."""
    least = max(n + lo, n + hi, n + lo + hi - span + 1, 1)
    return -(-least // stride) * stride


def _circular_padded_norm(kernel: Tensor, geometry: ConvGeometry) -> float:
    strides, repeats = [], 1
    for n, (lo, hi), span, s in zip(
        geometry.input_size, geometry.pads, kernel.shape[-2:], geometry.stride, strict=True
    ):
        outputs = (n + lo + hi - span) // s + 1
        rows = [(o * s - lo) % n for o in range(outputs)]
        repeats *= max(rows.count(r) for r in set(rows))
        strides.append(s if n % s == 0 else 1)  # polyphase needs the torus to be a multiple of s
    return math.sqrt(repeats) * circular_norm(kernel, geometry.input_size, tuple(strides))


def max_copies(n: int, pad: tuple[int, int], mode: str) -> int:
    """Largest number of times one input pixel appears in the ``mode``-padded input."""
    index = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
    padded = F.pad(index, pad, mode=mode).long().flatten()  # (n + lo + hi,)
    return int(torch.bincount(padded, minlength=n).max())


def circular_norm(kernel: Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> float:
    """Sound upper bound (float64) of the norm of the stride-``stride`` circular convolution.

    ``kernel``: (groups, c_out_g, c_in_g, kh, kw), float64; ``grid``: the torus, a multiple of the
    stride per axis. Max over groups and the (grid / stride) frequencies of sigma_1 of the
    polyphase symbol: the largest eigenvalue of the symbol's smaller Gram, formed from the
    kernel's self-correlation (module docstring, Rounding).
    """
    groups, c_out, c_in, kh, kw = kernel.shape
    poly = polyphase_kernel(kernel.reshape(groups * c_out, c_in, kh, kw), stride)
    # Divided by a power of two, every tap is below 2 and at least one at or above 1. The division
    # is exact except for taps pushed below 2^-1022 (2^-1074 off at most, each): their change of
    # the norm, <= taps * 2^-1074, is far inside the rounding slack (>= 64 u, the Gram >= 1).
    scale = float(power_of_two_scale(poly))
    poly = (poly / scale).reshape(groups, c_out, *poly.shape[1:])
    if poly.shape[2] > c_out:  # the smaller Gram: S S^H, the correlation over the input channels
        poly = poly.transpose(1, 2)
    taps = poly.shape[-2:]
    corr = tap_pair_correlation(poly)  # (groups, n, n, 2 bh - 1, 2 bw - 1)
    n = corr.shape[1]
    flat = corr.reshape(groups * n, n, *corr.shape[-2:])
    offsets = (grid[0] // stride[0], grid[1] // stride[1])
    twiddles = grid_twiddles(corr.shape[-2:], offsets, flat, origin=(taps[0] - 1, taps[1] - 1))
    chunk = max(1, SYMBOL_CHUNK_ELEMENTS // flat.shape[0] // n)
    # Grams are positive semidefinite: 0 is a floor (the kernel is finite: conv_operator_norm)
    largest = 0.0
    for part in twiddles.split(chunk, dim=-1):
        grams = kernel_symbol(flat, part).reshape(-1, n, n)  # (frequencies x groups, n, n)
        largest = max(largest, gram_max_eigenvalue_bound(grams))
    squared = largest + _gram_rounding(poly, flat)
    # the square root rounds within one unit; times 2^e is exact unless it lands below the normal
    # range: one unit up covers that rounding
    return math.nextafter(math.sqrt(squared) * rounding_safety(torch.float64, 1) * scale, math.inf)


def _gram_rounding(poly: Tensor, corr: Tensor) -> float:
    """Bound of ||computed Gram - exact Gram||_2 at any frequency, for :func:`circular_norm`.

    The Gram at frequency w is G(w) = sum_d corr(d) e^{-i w.d} (its transpose is S(w)^H S(w) for
    the correlation over the output channels, which has the same eigenvalues). Its computed value
    is off by the correlation's rounding, carried through the exact transform, and by the
    transform's own. The first is entrywise at most gamma_N sum_d A(d), A the correlation of |K|
    (:func:`tap_pair_correlation`, N = rows + taps); the second at most gamma_T sum_d |corr(d)|
    <= gamma_T (1 + gamma_N) sum_d A(d) (:func:`symbol_rounding`'s argument, T the offsets).
    sum_d A(d) = B^T B exactly, B[o, i] = sum_a |K[o, i, a]|, whose computed sums of nonnegative
    terms are at most a factor 1 - gamma below the exact ones: in spectral norm, at most
    (gamma_N + gamma_T (1 + gamma_N)) ||B^T B||_F, enlarged. Doubled: LAPACK reads the Gram's
    lower triangle, whose mirror image is off by the same entrywise bounds mirrored (Frobenius
    norm at most sqrt(2) times theirs). Plus the underflows, at most u tiny each, (N + T) per
    entry.
    """
    rows, n, bh, bw = poly.shape[1:]
    offsets = corr.shape[-2] * corr.shape[-1]
    gamma_n = rounding_safety(torch.float64, rows + bh * bw) - 1
    gamma_t = rounding_safety(torch.float64, offsets + 1) - 1
    sums = poly.abs().sum(dim=(-2, -1))  # B: (groups, rows, n)
    size = float(torch.linalg.matrix_norm(sums.mT @ sums).max())
    size *= rounding_safety(torch.float64, 2 * (rows + bh * bw) + n * n)
    underflow = n * (rows + bh * bw + offsets) * torch.finfo(torch.float64).tiny
    return 2 * (gamma_n + gamma_t * (1 + gamma_n)) * size + underflow
