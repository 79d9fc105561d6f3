"""Sound l2 operator-norm bound of a 2-D convolution, valid for every input size.

Why the symbol bounds every convolution with that kernel
--------------------------------------------------------
A stride-1 circular convolution on an N1 x N2 torus is block-diagonalised by the 2-D DFT (Sedghi
et al., ICLR 2019, Thm. 6): at the grid frequency w it multiplies the input's spectrum by the
c_out x c_in *symbol* K^(w) = sum_a K[:, :, a] e^{-i w.a}, so its norm is the largest
sigma_1(K^(w)) over the grid. Hence F = sup over *all* w in [0, 2 pi)^2 of sigma_1(K^(w)) bounds
the circular convolution on every torus. A zero-padded convolution (any padding, any input size)
is a restriction of the circular one on a torus large enough that nothing wraps around: embed the
zero-extended input, keep the valid outputs, both of norm <= 1. Stride keeps a subset of outputs.
Circular padding of at most (k - 1) / 2 a side is the circular convolution on the input's own
torus, restricted to some outputs; more padding wraps twice and repeats outputs (not covered).

Stride, tighter: a stride-s convolution equals a stride-1 convolution of the space-to-depth input
(a permutation) with the *polyphase* kernel K'[:, (i, r), b] = K[:, i, s b + r] (c_in s1 s2 input
channels, ceil(k / s) taps), on tori whose size is a multiple of s. That covers zero padding at
every input size (choose the big torus a multiple of s), but not circular padding of an input whose
size is not a multiple of s: there pass ``stride=1``, whose bound holds on every torus.

Input-size independence: from a grid to the supremum
----------------------------------------------------
Let w* maximise sigma_1(K^(w)), and u, v unit vectors with u^H e^{i w*.c} K^(w*) v = F, c the
kernel centre ((k - 1) / 2 per axis, removing the linear phase). p(w) = Re(u^H e^{i w.c} K^(w) v)
is a real exponential sum with frequencies a - c, |a_i - c_i| <= (k_i - 1) / 2, and
p <= sigma_1(K^(w)) <= F everywhere, with p(w*) = F. Along the segment from w* to its nearest grid
point g (|g_i - w*_i| <= pi / N_i), q(t) = p(w* + t (g - w*)) has exponential type at most
s = sum_i ((k_i - 1) / 2) pi / N_i, and |q| <= F. Bernstein's inequality for bounded functions of
exponential type (Bernstein 1923; Boas, *Entire Functions*, 1954, Ch. 11), applied twice, gives
|q''| <= s^2 F; q'(0) = 0 at the maximum, so by Taylor q(1) >= F (1 - s^2 / 2). Hence

    F <= max_grid sigma_1(K^(g)) / (1 - s^2 / 2),

and the grid is chosen per axis from ``grid_slack`` so that 1 / (1 - s^2 / 2) <= 1 + grid_slack.
K is real, so K^(-w) = conj(K^(w)) has the same singular values: only the rfft2 half-spectrum
(N1 x (N2 // 2 + 1) frequencies) is evaluated, less the conjugates within its columns k2 = 0 and
N2 / 2 (40 -> 34 frequencies for the LMT CNN's second convolution).

Per-frequency bounds and rounding
---------------------------------
Each sigma_1(K^(g)) is bounded by Gram iteration (:func:`~lipcert.bounds.operator.
gram_spectral_bound`, Delattre et al., ICML 2023), never by power iteration. The symbol is the
sum over taps of the real kernel times twiddles rounded from float64, evaluated as one complex
matrix product whose real and imaginary parts are each a real dot product over the taps (the
kernel's zero imaginary parts add exact zeros; BLAS may sum in another order than a real product,
which the bound does not depend on); each entry's error is at most gamma * sum_a |K[o, i, a]|
(Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5; the twiddles' own rounding,
their phases reduced exactly in integers, adds about u), so ||E(g)||_2 <= ||E(g)||_F <=
gamma ||A||_F with A[o, i] = sum_a |K[o, i, a]|, added by Weyl's inequality. All of it runs in
the kernel's dtype (float32 for half-precision kernels). The maximum over frequencies is taken
without autograd; only the maximising frequency is recomputed with gradients, which is exactly
the gradient of the maximum and keeps the backward pass small.

Measured (random Gaussian 3 x 3 kernels, float64, 3 seeds; "exact" is the zero-padded "same"
convolution's norm: dense SVD up to 16 x 16, converged power iteration at 32 x 32, a lower bound,
so those ratios are over-estimates). bound / exact, never below 1:

=================== ========= ========= ==========
grid_slack          16 ch 16² 16 ch 32² 64 ch 32²
=================== ========= ========= ==========
0.02 (default)      1.031     1.022     1.022
0.01                1.021     1.012     1.012
0.005               1.016     1.008     1.007
=================== ========= ========= ==========

The grid factor dominates (the grid maximum is within ~0.2% of the supremum); the rest is the
zero-padding deficit of small inputs (1.1% at 16 x 16, 0.2% at 32 x 32), which no
input-size-independent bound can remove. Cost for a 64 -> 64 3 x 3 float32 kernel, one CPU thread,
forward + backward (the plain Conv2d step it normalises, batch 64 at 32 x 32: 85 ms): 67 ms at
slack 0.05, 250 ms at 0.02, 630 ms at 0.01, 1.3 s at 0.005; stride 2 (polyphase) 200 ms at 0.02.
It grows as c^3 / grid_slack (128 -> 128 channels: ~2 s at 0.02).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lipcert.bounds.operator import gram_iteration_bound, power_of_two_scale, rounding_safety
from lipcert.caching import shape_cache
from lipcert.precision import autocast_off, ieee_float32

#: Default relative slack of the grid step: 1 / (1 - s^2 / 2) <= 1.02, a 32 x 17 half-spectrum for
#: a 3 x 3 kernel (tightness and cost: "Measured" in the module docstring).
DEFAULT_GRID_SLACK = 0.02
#: Gram iterations per frequency: overestimates sigma_1 by at most rank^(1/2^(t+1)) (Delattre et
#: al., ICML 2023, Thm. 1), 1.008 for rank 64 at t = 8 even with a perfectly flat spectrum.
DEFAULT_CONV_GRAM_ITERATIONS = 8
#: Frequencies per batch, times c_out * c_in, kept under this many complex entries (memory cap).
SYMBOL_CHUNK_ELEMENTS = 2**24


def to_pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """``value`` as a pair of positive ints; a ValueError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def polyphase_kernel(kernel: Tensor, stride: tuple[int, int]) -> Tensor:
    """The stride-1 kernel of the space-to-depth input equivalent to ``kernel`` at ``stride``.

    K'[:, (i, r1, r2), b1, b2] = K[:, i, s1 b1 + r1, s2 b2 + r2] (zero past the kernel's end).
    """
    s1, s2 = stride
    c_out, c_in, kh, kw = kernel.shape
    bh, bw = -(-kh // s1), -(-kw // s2)
    padded = F.pad(kernel, (0, bw * s2 - kw, 0, bh * s1 - kh))  # (c_out, c_in, bh*s1, bw*s2)
    blocks = padded.reshape(c_out, c_in, bh, s1, bw, s2)  # tap a = s b + r
    return blocks.permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * s1 * s2, bh, bw)


def grid_size(kernel_size: tuple[int, int], grid_slack: float) -> tuple[int, int]:
    """Smallest grid whose s splits evenly over the axes of size > 1 within ``grid_slack``."""
    s_max = math.sqrt(2 * grid_slack / (1 + grid_slack))  # 1 / (1 - s^2 / 2) = 1 + grid_slack
    axes = sum(k > 1 for k in kernel_size)
    return tuple(max(1, math.ceil(math.pi * (k - 1) * axes / (2 * s_max))) for k in kernel_size)


def grid_factor(kernel_size: tuple[int, int], grid: tuple[int, int]) -> float:
    """1 / (1 - s^2 / 2), s = sum_i ((k_i - 1) / 2) pi / N_i: sup over w <= factor * grid max."""
    s = sum((k - 1) / 2 * math.pi / n for k, n in zip(kernel_size, grid, strict=True))
    if s * s >= 2:
        raise ValueError(f"grid {grid} is too coarse for kernel size {kernel_size}")
    return 1 / (1 - s * s / 2)


def grid_twiddles(
    kernel_size: tuple[int, int],
    grid: tuple[int, int],
    kernel: Tensor,
    origin: tuple[int, int] = (0, 0),
) -> Tensor:
    """Angles w.a of the half-spectrum grid, as (cos, sin) in the kernel's dtype: (2, taps, F),
    the taps a numbered from ``origin`` (a tap's position minus it, per axis). A new tensor each
    call, from float64 values computed once per shape (:func:`_float64_twiddles`)."""
    cached = _float64_twiddles(_int_pair(kernel_size), _int_pair(grid), _int_pair(origin))
    return cached.to(kernel.device, kernel.dtype, copy=True)


def _int_pair(pair: tuple[int, int]) -> tuple[int, int]:
    """``pair`` as Python ints, the cache key of :func:`_float64_twiddles`: NumPy integers (of
    equal hash, but products that wrap around) or floats (which NumPy refuses) shared an entry."""
    first, second = pair
    return operator.index(first), operator.index(second)


@shape_cache
def _float64_twiddles(
    kernel_size: tuple[int, int], grid: tuple[int, int], origin: tuple[int, int]
) -> Tensor:
    """:func:`grid_twiddles` in float64 on the CPU (kept by the cache: never handed out itself).

    The phase a.j / N is reduced modulo 1 exactly in integers, so each float64 angle lies in
    [0, 2 pi) within 20 units of roundoff of the exact one (covered by :func:`symbol_rounding`).
    The integer part runs in NumPy (a dozen operations on small arrays: ~0.2 ms less than in
    torch, the same angles bit for bit); computed once per shape (~0.4 ms a call of the LMT CNN's
    bound, two convolutions).
    """
    n1, n2 = grid
    taps = np.indices(kernel_size).reshape(2, -1).T - np.array(origin)  # (taps, 2)
    freqs = np.indices((n1, n2 // 2 + 1)).reshape(2, -1).T  # (F, 2)
    # On the half-spectrum's self-conjugate columns (k2 = 0, and n2 / 2 for even n2), (k1, k2)
    # and (-k1, k2) are conjugate, with the same singular values: keep one of each pair.
    self_conjugate = (freqs[:, 1] == 0) | (2 * freqs[:, 1] == n2)
    freqs = freqs[~self_conjugate | (freqs[:, 0] <= (-freqs[:, 0]) % n1)]
    phase1 = (taps[:, :1] * freqs[:, 0]) % n1  # (taps, F)
    phase2 = (taps[:, 1:] * freqs[:, 1]) % n2
    phase = (phase1 * n2 + phase2 * n1) % (n1 * n2)  # the angle is 2 pi phase / (n1 n2), exactly
    angles = torch.from_numpy(phase).double() * (2 * math.pi / (n1 * n2))
    return torch.stack((angles.cos(), angles.sin()))


def kernel_symbol(kernel: Tensor, twiddles: Tensor) -> Tensor:
    """K^(w) for the frequencies of ``twiddles`` (see :func:`grid_twiddles`): (F, c_out, c_in)."""
    c_out, c_in = kernel.shape[:2]
    flat = kernel.reshape(c_out * c_in, -1).T  # (taps, c_out*c_in)
    flat = flat.to(torch.promote_types(flat.dtype, torch.complex64))
    phases = torch.complex(twiddles[0].T, -twiddles[1].T)  # (F, taps): e^{-i w.a}
    # One complex product, frequency-major: every K^(w) contiguous (a frequency-minor symbol
    # made each batched product copy its matrices one by one: 0.9 ms instead of 0.3), and no
    # complex array assembled from real and imaginary ones (2.8 -> 1.2 ms for 64 x 64 x 3 x 3
    # kernels at 145 frequencies). The kernel's zero imaginary parts add exact zeros, so each
    # part of an entry is a real dot product over the taps, within symbol_rounding's bound; not
    # bit for bit the old real products' (cgemm sums in its own order: ulps apart at 2 x 2 taps).
    return (phases @ flat).view(-1, c_out, c_in)


def tap_pair_correlation(kernel: Tensor) -> Tensor:
    """The self-correlation of a batch of kernels over their output channels, corr[g, i, j, d] =
    sum_o sum_u K[g, o, i, u + d] K[g, o, j, u]: ``(groups, c_out, c_in, kh, kw)`` ->
    ``(groups, c_in, c_in, 2 kh - 1, 2 kw - 1)``, offset d at index d + (k - 1) per axis.

    One matrix product gives every pair of taps (a, b), sum_o K[o, i, a] K[o, j, b]; the pairs
    are then summed by offset a - b. Each entry is a sum of c_out * kh * kw products, in nested
    sums of at most c_out + kh kw levels whatever their order, so its rounding error is at most
    gamma_(c_out + kh kw) times the same sum of |products| (Higham, eq. 3.5), the correlation of
    |K|. No convolution routine: those may choose FFT or Winograd algorithms, with no such bound.
    """
    groups, c_out, c_in, kh, kw = kernel.shape
    taps = kernel.permute(0, 3, 4, 2, 1).reshape(groups, kh * kw * c_in, c_out)  # rows (a, i)
    pairs = (taps @ taps.mT).view(groups, kh * kw, c_in, kh * kw, c_in)
    pairs = pairs.permute(0, 2, 4, 1, 3).reshape(groups, c_in, c_in, -1)  # [g, i, j, (a, b)]
    position = np.indices((kh, kw)).reshape(2, -1)  # (2, taps)
    offset = position[:, :, None] - position[:, None, :] + np.array([[[kh - 1]], [[kw - 1]]])
    flat_offset = torch.from_numpy((offset[0] * (2 * kw - 1) + offset[1]).reshape(-1))
    corr = kernel.new_zeros(groups, c_in, c_in, (2 * kh - 1) * (2 * kw - 1))
    corr.index_add_(3, flat_offset.to(kernel.device), pairs)
    return corr.view(groups, c_in, c_in, 2 * kh - 1, 2 * kw - 1)


def symbol_rounding(kernel: Tensor) -> Tensor:
    """Bound of ||computed symbol - exact symbol||_2 at any frequency (module docstring)."""
    taps = kernel.shape[-2] * kernel.shape[-1]
    gamma = rounding_safety(kernel.dtype, taps + 1) - 1
    return gamma * torch.linalg.matrix_norm(kernel.abs().sum(dim=(-2, -1)))


def _frequency_bounds(kernel: Tensor, twiddles: Tensor, n_iter: int) -> Tensor:
    """Gram bound of sigma_1(K^(g)) at every grid frequency, in chunks: (F,)."""
    chunk = max(1, SYMBOL_CHUNK_ELEMENTS // (kernel.shape[0] * kernel.shape[1]))
    parts = [
        gram_iteration_bound(kernel_symbol(kernel, part), n_iter)
        for part in twiddles.split(chunk, dim=-1)
    ]
    return torch.cat(parts)


def _grid_maximum(kernel: Tensor, twiddles: Tensor, n_iter: int) -> Tensor:
    """max over the grid of the per-frequency bounds, differentiable through the maximiser: the
    value is the batch's maximum bit for bit (with or without autograd), the gradient that of
    the maximiser's bound recomputed alone (whose last bits may differ: both bound it soundly)."""
    with torch.no_grad():
        bounds = _frequency_bounds(kernel.detach(), twiddles, n_iter)
    best = bounds.max()
    if not (torch.is_grad_enabled() and kernel.requires_grad):
        return best
    at_best = twiddles[..., bounds.argmax()].unsqueeze(-1)  # (2, taps, 1)
    with_grad = gram_iteration_bound(kernel_symbol(kernel, at_best), n_iter)[0]
    return best + (with_grad - with_grad.detach())


def conv2d_operator_bound(
    kernel: Tensor,
    stride: int | tuple[int, int] = 1,
    grid_slack: float = DEFAULT_GRID_SLACK,
    n_iter: int = DEFAULT_CONV_GRAM_ITERATIONS,
) -> Tensor:
    """Sound upper bound of the l2 operator norm of ``F.conv2d(x, kernel, stride=stride, ...)``.

    ``kernel``: (c_out, c_in, kh, kw). Valid for every input size with zero padding (any amount),
    and for circular padding of at most (k - 1) / 2 a side with ``stride=1`` (or inputs whose size
    is a multiple of the stride).
    The bound exceeds the supremum of the symbol's norm by at most ``1 + grid_slack`` times the
    Gram-iteration slack; see the module docstring for the derivation. Differentiable, computed
    in the kernel's dtype with its rounding accounted for (float32 for a float16 or bfloat16
    kernel, which it holds exactly: torch has no bfloat16 complex type, and complex32 products
    fail); a scalar tensor of that dtype.
    """
    if kernel.dim() != 4:
        raise ValueError(f"kernel must have shape (c_out, c_in, kh, kw), got {tuple(kernel.shape)}")
    if not 0 < grid_slack < 1:
        raise ValueError(f"grid_slack must lie in (0, 1), got {grid_slack}")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0 (Gram iterations), got {n_iter!r}")
    kernel = kernel.to(torch.promote_types(kernel.dtype, torch.float32))
    kernel = polyphase_kernel(kernel, to_pair("stride", stride))  # (c_out, c_in*s1*s2, bh, bw)
    kernel_size = tuple(kernel.shape[-2:])
    grid = grid_size(kernel_size, grid_slack)
    power = power_of_two_scale(kernel)  # the bound is homogeneous (kernels ~1e20 gave inf)
    kernel = kernel / power
    # rounding is analysed in the kernel's dtype: no TF32, no autocast
    with ieee_float32(), autocast_off(kernel.device):  # also on devices ieee_float32 leaves
        twiddles = grid_twiddles(kernel_size, grid, kernel)
        grid_max = _grid_maximum(kernel, twiddles, n_iter) + symbol_rounding(kernel)
    return grid_max * power * (grid_factor(kernel_size, grid) * rounding_safety(kernel.dtype, 1))
