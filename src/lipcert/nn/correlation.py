"""The absolute self-correlation sums of a kernel: the Schur-test row sums of AOL and SLL.

For a convolution A with kernel K (c_out x c_in x kh x kw), the Gram A^T A is built from the
kernel's self-correlation corr(d) = sum_{a - b = d} K_a^T K_b over the (2kh - 1) x (2kw - 1)
offsets d (Prach & Lampert 2022, Thm. 2), and AOL's and SLL's scales come from the sums
S_ij = sum_d |corr_ij(d)|. :func:`abs_correlation_sums` computes S, differentiably, in few
products: corr is a product of polynomials, C(z) = sum_d corr(d) z^d = K(z)^T K(1/z) with
K(z) = sum_a K_a z^a, so it evaluates K at points z, multiplies there and interpolates corr back
(Toom-Cook / Winograd's minimal filtering, for a correlation of a kernel with itself):

* a 1 x 1 kernel (a dense layer): corr = K^T K, one product;
* a 3 x 3 kernel (float32, float64): at 25 real points, 13 products, the fewest an evaluation
  scheme can use (the 25 offsets hold 12 independent corr(d) and the symmetric corr(0); one
  product gives one matrix) (:func:`_real_point_matrices`);
* any other: at the discrete Fourier frequencies, 3 real products per pair of conjugate ones
  (:func:`_fourier_matrices`). Real points amplify rounding too much beyond 3 x 3: for 5 x 5 the
  best of 300 random sets of 41 points gave 2.2e5 by the measure of :data:`REAL_POINTS`, against
  the DFT's 625 (/tmp script).

:func:`kernel_self_correlation` computes corr itself, by the convolution (the reference, and the
float64 path of the a-posteriori bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lipcert.bounds.conv import tap_pair_correlation
from lipcert.bounds.operator import power_of_two_scale
from lipcert.caching import shape_cache
from lipcert.precision import autocast_off

#: The points z of :func:`_real_point_matrices` beside (1, 1), one of each pair {z, 1/z}: the
#: 12 pairs, among the 2-d points with coordinates in {+-1, +-2, +-3, +-4} and their inverses
#: and {+-3/2, +-3/4, +-4/3}, that a local search (30 restarts) found to minimize the float
#: rounding's amplification, max_d sum_z |M^-1_dz| |K|(z) |K|(1/z) (M the interpolation's 25 x 25
#: system, |K|(z) = sum_a |z^a|): 218, against 608 for the best set by condition number alone.
REAL_POINTS = (
    (4.0, 1 / 4),
    (-4.0, 4.0),
    (-3 / 4, 1.0),
    (-3 / 4, -3 / 4),
    (1.0, 4.0),
    (4.0, -1 / 3),
    (1.0, -3 / 2),
    (-3 / 2, -3 / 4),
    (4.0, -1.0),
    (4.0, 1.0),
    (4.0, 4.0),
    (-1.0, 4.0),
)

#: The dtypes whose 3 x 3 kernels take the real points. Real points amplify rounding more than
#: the DFT (218 against 81 by the measure above: |K|(w) = 9 on the unit circle, and the inverse
#: DFT's 25 weights are 1/25). At float32's 24 bits it stays far below ROW_SUM_MARGIN (row sums
#: within 8.5e-7 of the float64 ones near AOL's init, against 4.1e-7 by the DFT; 1.6e-7 and
#: 3.3e-7 for random kernels; /tmp script, 6 shapes), but 16-bit kernels keep the DFT: over 10
#: random bfloat16 8 -> 8 kernels the gradient was up to 31% off the float64 one of the same
#: values with real points (median 15%), 16% with the DFT (median 10%).
REAL_POINT_DTYPES = (torch.float32, torch.float64)


def kernel_self_correlation(kernel: Tensor) -> Tensor:
    """Self-correlation of a kernel over its output channels: the entries of the Gram ``A^T A``.

    ``kernel`` is ``(c_out, c_in, kh, kw)`` (the operator A maps c_in to c_out channels). Returns
    ``(c_in, c_in, 2kh-1, 2kw-1)`` with corr[i, j, d] = sum_o sum_u K[o, i, u + d] K[o, j, u]:
    the entry of A^T A between channel i at position p + d and channel j at position p, for a
    stride-1 convolution on the whole plane (Prach & Lampert 2022, Thm. 2). Differentiable; one
    kernel of :func:`lipcert.bounds.conv.tap_pair_correlation` (its rounding bound holds).
    """
    return tap_pair_correlation(kernel[None])[0]


@shape_cache
def _fourier_matrices(kh: int, kw: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """The real DFT matrices of :func:`_fourier_sums` for a kh x kw kernel.

    Torus: n = (2kh - 1)(2kw - 1) points, so that corr(d), d in [-(kh-1), kh-1] x [-(kw-1), kw-1],
    maps one to one onto it (no wrap-around). Frequencies: w = 0 and one of each conjugate pair
    {w, -w}, m = (n + 1) / 2 of them (n is odd, so w = 0 is the only self-conjugate one). Returns
    (``dft``, ``inverse``, m):

    * ``dft`` (n, kh kw) maps the flat kernel positions p to the symbols K^(w) = sum_p K_p
      e^{-i w.p}: rows 0..m-1 their real parts at every frequency, rows m..n-1 their imaginary
      parts at the m - 1 frequencies w != 0 (at w = 0 it is 0);
    * ``inverse`` (n offsets, n) maps the parts [P_w (m); Q_w (m - 1)] of the transformed
      correlation corr^(w) = P_w - i Q_w back to corr(d) = (1/n) sum over all w of corr^(w)
      e^{i w.d}, the pair (w, -w) counted twice through the real part. Its rows take the offsets
      in the order [0; H; -H]: H one of each pair {d, -d} (as for the frequencies), then their
      negatives in the same order, so that the first m rows give corr(d) for d in {0} + H.

    (A 1 x 1 kernel, a dense layer, needs neither: n = m = 1 and both are [[1]].) Built in
    float64, once per shape, device and dtype.
    """
    n1, n2 = 2 * kh - 1, 2 * kw - 1
    grid = [(a, b) for a in range(n1) for b in range(n2)]
    pairs = [f for f in grid[1:] if f < ((-f[0]) % n1, (-f[1]) % n2)]
    freqs = torch.tensor([(0, 0), *pairs], dtype=torch.float64)
    taps = torch.tensor([(a, b) for a in range(kh) for b in range(kw)], dtype=torch.float64)
    mirrored = [((-a) % n1, (-b) % n2) for a, b in pairs]
    offsets = torch.tensor([(0, 0), *pairs, *mirrored], dtype=torch.float64)

    def angles(points: Tensor) -> Tensor:  # (points, m): 2 pi w.p on the torus
        return 2 * math.pi * (points[:, :1] * freqs[:, 0] / n1 + points[:, 1:] * freqs[:, 1] / n2)

    forward = angles(taps).T  # (m, kh kw)
    dft = torch.cat([forward.cos(), -forward[1:].sin()])
    counts = torch.full((len(freqs),), 2.0, dtype=torch.float64)
    counts[0] = 1
    inverse = angles(offsets)  # (n, m)
    inverse = torch.cat([inverse.cos() * counts, inverse[:, 1:].sin() * counts[1:]], dim=1)
    return dft.to(device, dtype), (inverse / len(grid)).to(device, dtype), len(freqs)


@shape_cache
def _real_point_matrices(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The evaluation and interpolation matrices of :func:`_real_point_sums` (3 x 3 kernels).

    Points: (1, 1), the 12 :data:`REAL_POINTS` z_k and their inverses 1/z_k, 25 in all, as many
    as the offsets d in [-2, 2]^2 of corr. Since C(1/z) = K(1/z)^T K(z) = C(z)^T, one product
    K(z_k)^T K(1/z_k) gives C at both points of a pair, and C(1, 1) = K(1, 1)^T K(1, 1) needs
    one more: 13 products for the 25 values. Returns (``evaluate``, ``interpolate``):

    * ``evaluate`` (25, 9) maps the flat kernel taps a (row-major, centred: a in {-1, 0, 1}^2)
      to [K(1, 1); K(z_k) (12); K(1/z_k) (12)], K(z) = sum_a K_a z^a;
    * ``interpolate`` (13, 25) maps [C(1, 1); C(z_k) (12); C(z_k)^T (12)] to corr(d) for d in
      {0} + H, H the offsets d > 0 (lexicographic), one of each pair {d, -d}: the rows of M^-1
      for those offsets, M_zd = z^d the system C(z) = sum_d corr(d) z^d.

    Built in float64 (M's condition number: 433), once per device and dtype.
    """
    taps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    offsets = [(a, b) for a in range(-2, 3) for b in range(-2, 3)]
    inverses = [(1 / s, 1 / t) for s, t in REAL_POINTS]
    points = [(1.0, 1.0), *REAL_POINTS, *inverses]

    def powers(exponents: list[tuple[int, int]]) -> Tensor:  # (points, exponents): z^e
        rows = [[s**e1 * t**e2 for e1, e2 in exponents] for s, t in points]
        return torch.tensor(rows, dtype=torch.float64)

    kept = [offsets.index((0, 0))] + [i for i, d in enumerate(offsets) if d > (0, 0)]
    interpolate = torch.linalg.inv(powers(offsets))[kept]
    return powers(taps).to(device, dtype), interpolate.to(device, dtype)


def _writes_in_place(tensor: Tensor) -> bool:
    """Whether ``out=`` buffers may hold the results computed from ``tensor``: not under a
    function transform (vmap has no ``out=`` rules: jacrev, per-sample gradients), tracing or
    compilation (which would record the ``out=`` ops)."""
    return not (
        torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    )


def _part(buffer: Tensor | None, rows: slice) -> Tensor | None:
    """``buffer[rows]`` as an ``out=`` target, or None (a new tensor) without a buffer."""
    return None if buffer is None else buffer[rows]


def _stored(kernel: Tensor) -> tuple[Tensor, bool]:
    """(base, flipped): ``kernel`` = base, or base.transpose(0, 1) when ``flipped``, that is when
    ``kernel`` is the channel-transposed view of a contiguous tensor (AOL's output side, SLL).
    The schemes read base as it lies in memory and write the gradient in its layout: the
    transposed view was copied by the evaluation, and its gradient, returned transposed, was
    added strided to the weight's other gradient. The benchmark's 256 -> 128 AOL weight
    (output side), forward + backward, 2 threads, median of 41: 4.18 -> 3.66 ms."""
    if not kernel.is_contiguous() and kernel.transpose(0, 1).is_contiguous():
        return kernel.transpose(0, 1), True
    return kernel, False


def _evaluate(matrix: Tensor, base: Tensor) -> Tensor:
    """``matrix`` (points, kh kw) applied to the taps of ``base`` (c_a, c_b, kh, kw): the
    polynomial's values, (points, c_a, c_b), one product reading base as it lies in memory."""
    c_a, c_b = base.shape[:2]
    return torch.mm(matrix, base.reshape(c_a * c_b, -1).T).view(-1, c_a, c_b)


def _evaluation_adjoint(matrix: Tensor, grads: Tensor, kernel_size: torch.Size) -> Tensor:
    """The adjoint of :func:`_evaluate`: dL/d(base), (c_a, c_b, kh, kw), from dL/d(values)
    ``grads``, (points, c_a, c_b). One product into (kh kw, c_a c_b), returned as a view: the
    product into base's layout took 0.92 ms against 0.21 for 256 x 128 3 x 3, the product
    followed by a transposed copy 0.44 ms, against 0.08 ms for the strided sum the view leaves
    to the gradient's accumulation."""
    c_a, c_b = grads.shape[1:]
    flat = torch.mm(matrix.T, grads.flatten(1))
    return flat.view(*kernel_size, c_a, c_b).permute(2, 3, 0, 1)


def _gram_view(values: Tensor, flipped: bool) -> Tensor:
    """The Gram kernel's matrices (c_out x c_in) among the values of base: themselves, or their
    transposes when ``flipped``."""
    return values.mT if flipped else values


def _product(a: Tensor, b: Tensor, flipped: bool, out: Tensor | None = None) -> Tensor:
    """a @ b (batched) of Gram-kernel matrices, as base lays them out: itself, or when
    ``flipped`` its transpose b^T a^T, so that the gradients land in base's layout."""
    if flipped:
        return torch.bmm(b.mT, a.mT, out=out)
    return torch.bmm(a, b, out=out)


def _add_product(
    total: Tensor, a: Tensor, b: Tensor, alpha: float, flipped: bool, in_place: bool
) -> Tensor:
    """total + alpha (a @ b) in :func:`_product`'s layout: into ``total`` where buffers may be
    written (:func:`_writes_in_place`), else a new tensor (vmap has no batching rule for
    ``baddbmm_``, and ``vmap(jacrev(...))`` refused it: its operands sit at different levels)."""
    if flipped:
        a, b = b.mT, a.mT
    if in_place:
        return total.baddbmm_(a, b, alpha=alpha)
    return torch.baddbmm(total, a, b, alpha=alpha)


def _sums_of_correlations(corr: Tensor, signs_out: Tensor | None) -> tuple[Tensor, Tensor]:
    """(S, signs) from ``corr``, (m, c_in, c_in): corr(d) for d in {0} + H, H one of each pair
    {d, -d}, which it overwrites. As corr(-d) = corr(d)^T, S = |C_0| + T + T^T with
    T = sum_{d in H} |corr(d)| and C_0 = (corr(0) + corr(0)^T) / 2 (exactly symmetric, as corr(0)
    is in exact arithmetic); the signs are those of [C_0; corr(H)], into ``signs_out`` if given."""
    corr[0] = (corr[0] + corr[0].mT) / 2  # C_0
    signs = torch.sign(corr, out=signs_out)
    corr = corr.abs_()
    half = corr[1:].sum(dim=0)  # T
    return corr[0] + half + half.mT, signs


def _dense_sums(base: Tensor, flipped: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A 1 x 1 kernel (a dense layer): corr = K^T K, one offset, one product."""
    values = base.reshape(1, *base.shape[:2])
    kernel = _gram_view(values, flipped)
    corr = torch.bmm(kernel.mT, kernel)
    return corr.abs().sum(dim=0), values, corr.sign()


def _real_point_sums(base: Tensor, flipped: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A 3 x 3 kernel at the 25 real points of :func:`_real_point_matrices`.

    The evaluations [U_0 = K(1, 1); U_k = K(z_k) (12); V_k = K(1/z_k) (12)] (one product with
    ``evaluate``), C_0 = U_0^T U_0 and C_k = U_k^T V_k (13 batched products), corr(d) for d in
    {0} + H from [C; C_k^T] (one product with ``interpolate``; the transposes are copied).
    Multiply-adds per channel triple (i, j, o): 13 forward, 25 backward (the Fourier scheme: 37
    and 49).
    """
    evaluate, interpolate = _real_point_matrices(base.device, base.dtype)
    m = len(interpolate)
    values = _evaluate(evaluate, base)
    evaluations = _gram_view(values, flipped)
    c_in = evaluations.shape[-1]
    points, inverses = evaluations[:m], evaluations[m:]
    in_place = _writes_in_place(base)
    buffer = base.new_empty(2 * m - 1, c_in, c_in) if in_place else None  # [C; C^T], signs
    centre = torch.bmm(points[:1].mT, points[:1], out=_part(buffer, slice(0, 1)))
    pairs = torch.bmm(points[1:].mT, inverses, out=_part(buffer, slice(1, m)))
    if in_place:
        buffer[m:] = pairs.mT
        stacked = buffer
    else:
        stacked = torch.cat([centre, pairs, pairs.mT])
    corr_out = base.new_empty(m, c_in * c_in) if in_place else None
    corr = torch.mm(interpolate, stacked.flatten(1), out=corr_out).view(m, c_in, c_in)
    sums, signs = _sums_of_correlations(corr, _part(buffer, slice(0, m)))
    return sums, values, signs


def _fourier_sums(base: Tensor, flipped: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Any kernel size, at the m frequencies of :func:`_fourier_matrices`.

    The symbols K^(w) = A + iB (c_out x c_in, real parts; one product with the DFT matrix); the
    transformed correlation corr^(w) = K^(w)^T conj(K^(w)) = P - iQ with P = A^T A + B^T B and
    Q = X - X^T, X = A^T B (three batched products, counting A^T A + B^T B as two); corr(d) for
    d in {0} + H by the inverse DFT (one product).
    """
    kh, kw = base.shape[2:]
    dft, inverse, m = _fourier_matrices(kh, kw, base.device, base.dtype)
    values = _evaluate(dft, base)
    symbols = _gram_view(values, flipped)  # [A (m); B (m - 1)]
    c_in = symbols.shape[-1]
    real, imag = symbols[:m], symbols[m:]
    in_place = _writes_in_place(base)
    parts = base.new_empty(len(symbols), c_in, c_in) if in_place else None  # [P; Q]
    spatial = base.new_empty(m, c_in, c_in) if in_place else None  # X, then corr
    cross = torch.bmm(real[1:].mT, imag, out=_part(spatial, slice(0, m - 1)))  # X
    gram = torch.bmm(real.mT, real, out=_part(parts, slice(0, m)))
    gram_tail = _add_product(gram[1:], imag.mT, imag, 1.0, False, in_place)  # P, w != 0
    skew = torch.sub(cross, cross.mT, out=_part(parts, slice(m, None)))  # Q
    stacked = parts if in_place else torch.cat([gram[:1], gram_tail, skew])
    corr_out = None if spatial is None else spatial.flatten(1)
    corr = torch.mm(inverse[:m], stacked.flatten(1), out=corr_out).view(m, c_in, c_in)
    sums, signs = _sums_of_correlations(corr, _part(parts, slice(0, m)))
    return sums, values, signs


class _AbsCorrelationSums(torch.autograd.Function):
    """:func:`abs_correlation_sums`: the forward of the kernel's scheme (module docstring:
    :func:`_dense_sums`, :func:`_real_point_sums`, :func:`_fourier_sums`) returns the sums, the
    values of K it multiplied (saved for the backward), the signs of [C_0; corr(H)] and the
    power of two the kernel was divided by.

    Backward: dL/dcorr(d) = sign(corr(d)) G for d in H, with G = g + g^T, and sign(C_0) G / 2
    through C_0, then the adjoints of the scheme's interpolation, products and evaluation
    (:func:`_real_point_gradient`, :func:`_fourier_gradient`). The signs of d and -d are those of
    one computed value, so the gradient is a subgradient of the sums also where corr is ~0 (every
    offset but the centre at AOL's init, where rounding gives the two offsets of a pair signs that
    need not match). Where corr is exactly 0 in exact arithmetic the computed one is rounding
    noise, and its sign (any sign is a subgradient of |.| at 0) depends on the device, the scheme
    and the order of the sums. A dead zone (sign 0 where |corr_ij(d)| <= 4 eps taps
    sqrt(corr_ii(0) corr_jj(0)), 9.5x the noise measured at exact zeros) was tried and dropped:
    the sums act as an l1 penalty that drives correlations to 0, and on a trained SLL net the zone
    held up to 12.5% of them, the gradient up to 123% off the computed function's, and 15-epoch
    runs lost 0.58 points at 1.58 (docs/results.md).
    Memory: outside function transforms the intermediate results go into buffers, one of which
    keeps the signs for the backward, in the kernel's dtype so that the backward reads them as
    they are. Fresh memory costs page faults (1.4 us per 4 KiB page measured here, as much as
    the arithmetic on it). A channel-transposed kernel is read, and its gradient written, in
    the layout of the tensor it views (:func:`_stored`).
    vmap: generated from the operations.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(kernel: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        base, flipped = _stored(kernel)
        sums_of, _ = _scheme(base)
        scale = power_of_two_scale(base)  # exact; the sums are homogeneous of degree 2
        sums, values, signs = sums_of(base / scale, flipped)
        return sums * (scale * scale), values, signs, scale

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, ...]) -> None:
        _, values, signs, scale = output
        ctx.save_for_backward(inputs[0], values, signs, scale)
        ctx.mark_non_differentiable(values, signs, scale)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the other outputs

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_unused: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        kernel, values, signs, scale = ctx.saved_tensors
        base, flipped = _stored(kernel)
        _, gradient = _scheme(base)
        with torch.no_grad(), autocast_off(grad.device):  # a backward run inside autocast
            scaled = gradient(grad, values, signs, flipped, base.shape[2:])  # at base / scale
            result = scaled.mul_(scale) if _writes_in_place(grad) else scaled * scale  # degree 1
        if flipped:
            result = result.transpose(0, 1)
        if torch.is_grad_enabled():  # create_graph: a second derivative must raise, not read 0
            return _DifferentiableOnce.apply(result, kernel, grad)
        return result


def _dense_gradient(
    grad: Tensor, values: Tensor, signs: Tensor, flipped: bool, kernel_size: torch.Size
) -> Tensor:
    """dL/dK of :func:`_dense_sums` from ``grad`` = dL/d(sums): K (dL/dcorr + dL/dcorr^T)."""
    per_offset = signs * grad  # dL/dcorr, corr = K^T K
    product = _product(_gram_view(values, flipped), per_offset + per_offset.mT, flipped)
    return product.view(*values.shape[1:], *kernel_size)


def _real_point_gradient(
    grad: Tensor, values: Tensor, signs: Tensor, flipped: bool, kernel_size: torch.Size
) -> Tensor:
    """dL/dK of :func:`_real_point_sums` from ``grad`` = dL/d(sums) and the saved values and
    signs: dL/dcorr by :class:`_AbsCorrelationSums`; dL/d[C; C^T] by the adjoint of the
    interpolation (one product), D_k = dL/dC_k = its rows k and (k + 12)^T; dL/dU_0 =
    U_0 (D_0 + D_0^T), dL/dU_k = V_k D_k^T, dL/dV_k = U_k D_k (25 batched products); dL/dK by the
    adjoint of the evaluation (one product)."""
    evaluate, interpolate = _real_point_matrices(grad.device, grad.dtype)
    m, c_in = len(interpolate), grad.shape[-1]
    in_place = _writes_in_place(grad)
    per_offset = signs * (grad + grad.mT)  # dL/dcorr(d), d in H; twice that of corr(0)
    per_offset[0] = per_offset[0] / 2
    stacked = (interpolate.T @ per_offset.flatten(1)).view(2 * m - 1, c_in, c_in)
    if in_place:
        products = stacked[:m]
        products[1:] += stacked[m:].mT
    else:
        products = torch.cat([stacked[:1], stacked[1:m] + stacked[m:].mT])  # D
    evaluations = _gram_view(values, flipped)
    points, inverses = evaluations[:m], evaluations[m:]
    grads = values.new_empty(values.shape) if in_place else None
    centre = products[:1] + products[:1].mT
    grad_centre = _product(points[:1], centre, flipped, _part(grads, slice(0, 1)))
    grad_points = _product(inverses, products[1:].mT, flipped, _part(grads, slice(1, m)))
    grad_inverses = _product(points[1:], products[1:], flipped, _part(grads, slice(m, None)))
    if not in_place:
        grads = torch.cat([grad_centre, grad_points, grad_inverses])
    return _evaluation_adjoint(evaluate, grads, kernel_size)


def _fourier_gradient(
    grad: Tensor, values: Tensor, signs: Tensor, flipped: bool, kernel_size: torch.Size
) -> Tensor:
    """dL/dK of :func:`_fourier_sums` from ``grad`` = dL/d(sums) and the saved symbols and signs.

    dL/dcorr by :class:`_AbsCorrelationSums`, extended to the offsets -d by E(-d) = E(d)^T (one
    transposed copy) and to E(0) = sign(C_0) G; the adjoint of the inverse DFT over all n offsets
    gives Hs = dL/dP + dL/dP^T and dX = dL/dX = dL/dQ - dL/dQ^T in one product, the inverse DFT's
    columns being even (P) or odd (Q) in d. Then dL/dA = A Hs - B dX, dL/dB = B Hs + A dX (four
    batched products) and dL/dK by the DFT's adjoint.
    """
    dft, inverse, m = _fourier_matrices(*kernel_size, grad.device, grad.dtype)
    in_place = _writes_in_place(grad)
    both = grad + grad.mT  # G
    per_offset = grad.new_empty(len(inverse), *grad.shape) if in_place else None  # E(d), all d
    half = torch.mul(signs, both, out=_part(per_offset, slice(0, m)))  # E(0), E(H)
    if in_place:
        per_offset[m:] = half[1:].mT  # E(-d) = E(d)^T
    else:
        per_offset = torch.cat([half, half[1:].mT])
    adjoint = (inverse.T @ per_offset.flatten(1)).view(per_offset.shape)  # [Hs (m); dX (m - 1)]
    sym, skew = adjoint[:m], adjoint[m:]
    symbols = _gram_view(values, flipped)
    real, imag = symbols[:m], symbols[m:]
    grads = values.new_empty(values.shape) if in_place else None
    grad_real = _product(real, sym, flipped, _part(grads, slice(0, m)))
    real_tail = _add_product(grad_real[1:], imag, skew, -1.0, flipped, in_place)  # A Hs - B dX
    grad_imag = _product(imag, sym[1:], flipped, _part(grads, slice(m, None)))
    grad_imag = _add_product(grad_imag, real[1:], skew, 1.0, flipped, in_place)  # B Hs + A dX
    if not in_place:
        grads = torch.cat([grad_real[:1], real_tail, grad_imag])
    return _evaluation_adjoint(dft, grads, kernel_size)


def _scheme(kernel: Tensor) -> tuple[Callable, Callable]:
    """(forward, gradient) of the scheme for ``kernel`` (module docstring): real points for 3 x 3
    kernels in :data:`REAL_POINT_DTYPES`, the DFT for the others."""
    kh, kw = kernel.shape[2:]
    if kh * kw == 1:
        return _dense_sums, _dense_gradient
    if (kh, kw) == (3, 3) and kernel.dtype in REAL_POINT_DTYPES:
        return _real_point_sums, _real_point_gradient
    return _fourier_sums, _fourier_gradient


#: What differentiating :func:`abs_correlation_sums` twice raises.
SECOND_DERIVATIVE_MESSAGE = (
    "abs_correlation_sums (the AOL / SLL row sums) is differentiable once: a second derivative "
    "through it (a gradient taken with create_graph=True, then differentiated) is not implemented"
)


class _DifferentiableOnce(torch.autograd.Function):
    """The gradient that :class:`_AbsCorrelationSums` computed without autograd, tied to the
    kernel and incoming gradient it depends on, with a backward that raises. Torch's
    ``once_differentiable`` ties it to the incoming gradient only, so where that was a constant
    (``abs_correlation_sums(k).sum()`` in a loss) a Hessian-vector product silently read the
    second derivative as 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gradient: Tensor, *_depends_on: Tensor) -> Tensor:
        return gradient.clone()

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx, *_grads: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)


def abs_correlation_sums(kernel: Tensor) -> Tensor:
    """sum_d |corr_ij(d)| of :func:`kernel_self_correlation`, ``(c_in, c_in)``.

    corr(d) = sum_{a - b = d} K_a^T K_b (K_a = ``kernel[:, :, a]``, c_out x c_in, at the flat
    spatial position a; Prach & Lampert 2022, Thm. 2) is a product of polynomials, computed by
    evaluation and interpolation (module docstring, :class:`_AbsCorrelationSums`). Multiply-adds
    per channel triple (i, j, o), forward and backward, in batched products: 3 x 3 kernels
    (float32 / float64) 13 and 25 at real points; the DFT 3m - 2 and 4m - 3, m =
    (2kh - 1)(2kw - 1) / 2 rounded up (3 x 3: 37 and 49; 7 x 7: 253 and 337); the Gram blocks
    K_a^T K_b took 45 and 81 at 3 x 3, the convolution 225. Exact up to float rounding (the
    matrices are rounded from float64; ROW_SUM_MARGIN absorbs it, measured in tests/test_aol.py).
    Measured (2 threads, forward + backward, median of 51, the same script before and after):
    real points against the DFT, 3.26 / 5.17 ms for the benchmark's 256 -> 128 layer (output
    side), 1.67 / 2.79 for 128 -> 128, 0.46 / 0.58 for 64 -> 64, 0.17 / 0.18 for 3 -> 64 (the
    products run near the machine's GEMM rate; the rest is mostly the evaluation and
    interpolation products, memory-bound). The DFT against the eleventh session's first version,
    which took the same time as the blocks at 3 x 3: 0.76x for 64 -> 64 at 5 x 5, 0.71x for
    128 -> 128 at 7 x 7. Differentiable once.

    :class:`_AbsCorrelationSums` divides the kernel by
    :func:`~lipcert.bounds.operator.power_of_two_scale` first (its largest entry then in [1, 2))
    and multiplies the sums back by its square, the gradient by it once: exact, the same bits
    for kernels of ordinary size, but no product overflows before the sums themselves do, and
    the gradient of a kernel whose sums overflow stays finite. Unscaled, the real
    points' products (|K|(z) |K|(1/z) up to 760 times the largest squared entry, against 81 on
    the unit circle) gave NaN sums, and AOL NaN weights, for a 1 x 1 x 3 x 3 kernel of 7e17s,
    whose sums are 4e37.
    """
    with autocast_off(kernel.device):
        return _AbsCorrelationSums.apply(kernel)[0]
