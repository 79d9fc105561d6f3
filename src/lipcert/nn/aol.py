"""Almost-Orthogonal Layers (Prach & Lampert, ECCV 2022, "Almost-Orthogonal Layers for Efficient
General-Purpose Lipschitz Networks") and the Schur-test machinery that SLL reuses.

AOL (Thm. 1 of the paper): for any matrix W, the column rescaling
D = diag(sum_j |W^T W|_ij)^(-1/2) gives ||W D||_2 <= 1. The proof is the Schur test: for a
symmetric G and positive weights p, lambda_max(G) <= max_i sum_j |G_ij| p_j / p_i; with
G = D W^T W D and p_j = 1 / d_j every weighted row sum is sum_j |W^T W|_ij d_i^2 = 1.

Convolutions (Thm. 2 of the paper): the Gram matrix of a convolution is built from the kernel's
self-correlation (:func:`kernel_self_correlation`), so the rescaling is per input channel,
d_i = (sum_j sum_offsets |corr_ij(offset)|)^(-1/2).

Output side: Thm. 1 applied to W^T gives ||W^T D'|| = ||D' W|| <= 1 with
D' = diag(sum_j |W W^T|_ij)^(-1/2), one scale per output channel, from the self-correlation of
the channel-transposed kernel (the adjoint convolution's kernel is also flipped in space, which
only reverses the offsets and leaves the absolute row sums unchanged). That correlation costs
~c_out^2 c_in instead of ~c_in^2 c_out (times the same kernel-size factor, see
:func:`abs_correlation_sums`): a factor c_out / c_in, cheaper when out < in.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from lipcert.bounds.conv import tap_pair_correlation
from lipcert.bounds.operator import power_of_two_scale, rounding_safety
from lipcert.caching import shape_cache
from lipcert.nn.constrained import (
    BoundedWeightConstraint,
    ConstrainedConv2d,
    ConstrainedLinear,
)
from lipcert.nn.constraint import original

#: Relative margin on every row sum the forward uses: (1 + ROW_SUM_MARGIN) r + RESCALE_EPS. It
#: absorbs the float32 rounding of r (which a worst-case error term would cover only at a cost of
#: ~0.2% for 64 and ~1.5% for 256 channels, 3x3), so the float64 a-posteriori bound certifies the
#: layer; measured in tests/test_aol.py and tests/test_sll.py, also after adversarial steps. It is
#: not the proof (the a-posteriori bound is) and it shrinks an AOL layer by 5e-5.
ROW_SUM_MARGIN = 1e-4

#: Added to every row sum so that an all-zero column (row sum 0) gets a finite scale. Enlarging a
#: row sum only lowers the Schur-test sums below 1, so this never breaks a bound.
RESCALE_EPS = 1e-12

#: Values of AOL's ``rescale`` argument: the side of W whose channels get the Schur scales.
RESCALE_SIDES = ("input", "output", "auto")


def as_kernel(weight: Tensor) -> Tensor:
    """View a linear weight ``(out, in)`` as a 1x1 convolution kernel ``(out, in, 1, 1)``."""
    return weight[:, :, None, None] if weight.dim() == 2 else weight


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
    """The real DFT matrices of :class:`_AbsCorrelationSums` for a kh x kw kernel.

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


def _add_products(total: Tensor, a: Tensor, b: Tensor, alpha: float, in_place: bool) -> Tensor:
    """total + alpha (a @ b), batched: into ``total`` where buffers may be written
    (:func:`_writes_in_place`), else a new tensor (vmap has no batching rule for ``baddbmm_``,
    and ``vmap(jacrev(...))`` refused it: its operands sit at different levels)."""
    if in_place:
        return total.baddbmm_(a, b, alpha=alpha)
    return torch.baddbmm(total, a, b, alpha=alpha)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device``'s type where it is on, else nothing (entering the
    context costs more than the row sums of a tiny kernel). The row sums' products write into
    float32 buffers, which autocast's bfloat16 products refused (a backward run inside
    ``torch.autocast`` raised), and the constraint's slack is for the kernel's own dtype."""
    available = torch.amp.is_autocast_available(device.type)  # not for 'meta' (it raised)
    if available and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _AbsCorrelationSums(torch.autograd.Function):
    """:func:`abs_correlation_sums` through the kernel's discrete Fourier transform.

    Forward: the symbols K^(w) = A + iB (c_out x c_in, real parts) at the m frequencies of
    :func:`_fourier_matrices` (one product with the DFT matrix); the transformed correlation
    corr^(w) = K^(w)^T conj(K^(w)) = P - iQ with P = A^T A + B^T B and Q = X - X^T, X = A^T B
    (three batched products, counting A^T A + B^T B as two); corr(d) for d in {0} + H, one of
    each pair {d, -d}, by the inverse DFT (one product). As corr(-d) = corr(d)^T, the sums are
    S = |C_0| + T + T^T with T = sum_{d in H} |corr(d)| and C_0 = (corr(0) + corr(0)^T) / 2
    (exactly symmetric, as corr(0) is in exact arithmetic).
    Backward: dL/dcorr(d) = sign(corr(d)) G for d in H, with G = g + g^T, and sign(C_0) G / 2
    through C_0. Extended to the offsets -d by E(-d) = E(d)^T (one transposed copy) and to E(0) =
    sign(C_0) G, the adjoint of the inverse DFT over all n offsets gives Hs = dL/dP + dL/dP^T and
    dX = dL/dX = dL/dQ - dL/dQ^T in one product, the inverse DFT's columns being even (P) or odd
    (Q) in d. The signs of d and -d are those of one computed value, so the gradient is a
    subgradient of the sums also where corr is ~0 (every offset but the centre at AOL's init, where
    the DFT's rounding gives the two offsets of a pair signs that need not match). Where corr is
    exactly 0 in exact arithmetic the computed one is rounding noise, and its sign (any sign is a
    subgradient of |.| at 0) depends on the device and the order of the sums. A dead zone (sign 0
    where |corr_ij(d)| <= 4 eps taps sqrt(corr_ii(0) corr_jj(0)), 9.5x the noise measured at exact
    zeros) was tried and dropped: the sums act as an l1 penalty that drives correlations to 0,
    and on a trained SLL net the zone held up to 12.5% of them, the gradient up to 123% off the
    computed function's, and 15-epoch runs lost 0.58 points at 1.58 (docs/results.md). Then
    dL/dA = A Hs - B dX, dL/dB = B Hs + A dX (four batched products) and dL/dK by the DFT's
    adjoint.
    Memory: outside function transforms the intermediate results go into two buffers, one of
    which keeps the signs of the m offsets for the backward, in the kernel's dtype so that the
    backward reads them as they are. Fresh memory costs page faults (1.4 us per 4 KiB page
    measured here, as much as the arithmetic on it).
    vmap: generated from the operations.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(kernel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_out, c_in, kh, kw = kernel.shape
        if kh * kw == 1:  # a dense layer: corr = K^T K, one offset
            symbols = kernel.reshape(1, c_out, c_in)
            corr = torch.bmm(symbols.mT, symbols)
            return corr.abs().sum(dim=0), symbols, corr.sign()
        dft, inverse, m = _fourier_matrices(kh, kw, kernel.device, kernel.dtype)
        flat = kernel.permute(2, 3, 0, 1).reshape(kh * kw, c_out * c_in)
        symbols = (dft @ flat).view(-1, c_out, c_in)  # [A (m); B (m - 1)]
        real, imag = symbols[:m], symbols[m:]
        in_place = _writes_in_place(kernel)
        parts = kernel.new_empty(len(symbols), c_in, c_in) if in_place else None  # [P; Q]
        spatial = kernel.new_empty(m, c_in, c_in) if in_place else None  # X, then corr
        cross = torch.bmm(real[1:].mT, imag, out=_part(spatial, slice(0, m - 1)))  # X
        gram = torch.bmm(real.mT, real, out=_part(parts, slice(0, m)))
        gram_tail = _add_products(gram[1:], imag.mT, imag, 1.0, in_place)  # P, w != 0
        skew = torch.sub(cross, cross.mT, out=_part(parts, slice(m, None)))  # Q
        stacked = parts if in_place else torch.cat([gram[:1], gram_tail, skew])
        corr_out = None if spatial is None else spatial.flatten(1)
        corr = torch.mm(inverse[:m], stacked.flatten(1), out=corr_out).view(m, c_in, c_in)
        corr[0] = (corr[0] + corr[0].mT) / 2  # C_0
        signs = torch.sign(corr, out=_part(parts, slice(0, m)))
        corr = corr.abs_()
        half = corr[1:].sum(dim=0)  # T
        return corr[0] + half + half.mT, symbols, signs

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _, symbols, signs = output
        ctx.save_for_backward(inputs[0], symbols, signs)
        ctx.mark_non_differentiable(symbols, signs)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for symbols and signs

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_unused: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        kernel, symbols, signs = ctx.saved_tensors
        with torch.no_grad(), _autocast_off(grad.device):  # a backward run inside autocast
            result = _correlation_sums_gradient(grad, symbols, signs, kernel.shape)
        if torch.is_grad_enabled():  # create_graph: a second derivative must raise, not read 0
            return _DifferentiableOnce.apply(result, kernel, grad)
        return result


def _correlation_sums_gradient(
    grad: Tensor, symbols: Tensor, signs: Tensor, kernel_shape: torch.Size
) -> Tensor:
    """dL/dK of :class:`_AbsCorrelationSums` from ``grad`` = dL/d(sums) and the saved symbols
    and signs of corr(d) (see there)."""
    c_out, c_in, kh, kw = kernel_shape
    if kh * kw == 1:
        per_offset = signs * grad  # dL/dcorr, corr = K^T K
        return torch.bmm(symbols, per_offset + per_offset.mT).view(kernel_shape)
    dft, inverse, m = _fourier_matrices(kh, kw, grad.device, grad.dtype)
    in_place = _writes_in_place(grad)
    both = grad + grad.mT  # G
    per_offset = grad.new_empty(len(inverse), c_in, c_in) if in_place else None  # E(d), all d
    half = torch.mul(signs, both, out=_part(per_offset, slice(0, m)))  # E(0), E(H)
    if in_place:
        per_offset[m:] = half[1:].mT  # E(-d) = E(d)^T
    else:
        per_offset = torch.cat([half, half[1:].mT])
    adjoint = (inverse.T @ per_offset.flatten(1)).view(per_offset.shape)  # [Hs (m); dX (m - 1)]
    sym, skew = adjoint[:m], adjoint[m:]
    real, imag = symbols[:m], symbols[m:]
    grad_symbols = symbols.new_empty(symbols.shape) if in_place else None
    grad_real = torch.bmm(real, sym, out=_part(grad_symbols, slice(0, m)))
    real_tail = _add_products(grad_real[1:], imag, skew, -1.0, in_place)  # A Hs - B dX
    grad_imag = torch.bmm(imag, sym[1:], out=_part(grad_symbols, slice(m, None)))
    grad_imag = _add_products(grad_imag, real[1:], skew, 1.0, in_place)  # B Hs + A dX
    if not in_place:
        grad_symbols = torch.cat([grad_real[:1], real_tail, grad_imag])
    flat = dft.T @ grad_symbols.flatten(1)  # (kh kw, c_out c_in)
    return flat.view(kh, kw, c_out, c_in).permute(2, 3, 0, 1)


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
    """sum_d |corr_ij(d)| of :func:`kernel_self_correlation`, ``(c_in, c_in)``, by the DFT.

    corr(d) = sum_{a - b = d} K_a^T K_b (K_a = ``kernel[:, :, a]``, c_out x c_in, at the flat
    spatial position a; Prach & Lampert 2022, Thm. 2) is a correlation, which the DFT on the
    (2kh - 1) x (2kw - 1) torus turns into products at each frequency, K^(w)^T conj(K^(w)); since
    K is real, half of the frequencies suffice (:class:`_AbsCorrelationSums`). Multiply-adds per
    channel triple (i, j, o): 3m - 2 forward and 4m - 3 backward, m = (2kh - 1)(2kw - 1) / 2
    rounded up (3 x 3: 37 and 49; the blocks K_a^T K_b took 45 and 81, the convolution 225;
    7 x 7: 253 and 337 against 1225 and 2401), in batched products; exact up to float rounding
    (the DFT matrices are rounded from float64; ROW_SUM_MARGIN absorbs it, measured in
    tests/test_aol.py). Measured (2 threads, forward + backward, /tmp script alternating the two
    versions, 100 rounds): against the previous Fourier version (of the eleventh session), which
    took the same time as the blocks at 3 x 3, 0.75x for the benchmark's 256 -> 128 layer (output
    side), 0.83x for 128 -> 128, 0.90x for 64 -> 64, 1.08x for 3 -> 64 (more operations on tiny
    arrays); 0.76x for 64 -> 64 at 5 x 5, 0.71x for 128 -> 128 at 7 x 7. Differentiable once.
    """
    with _autocast_off(kernel.device):
        return _AbsCorrelationSums.apply(kernel)[0]


def _weighted_row_sums(abs_gram: Tensor, weights: Tensor | None) -> Tensor:
    """r_i = sum_j abs_gram_ij w_j / w_i (``weights`` ``None``: all ones)."""
    if weights is None:
        return abs_gram.sum(dim=1)
    return (abs_gram @ weights) / weights


def correlation_row_sums(kernel: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted Schur row sums r_i = sum_j sum_d |corr_ij(d)| w_j / w_i of ``kernel``'s Gram.

    By the Schur test, max_i r_i bounds lambda_max(A^T A) = ||A||^2 for any positive ``weights``
    (``None``: all ones). Differentiable, from :func:`abs_correlation_sums` (the training path,
    through the DFT; :func:`sound_row_sums` computes the same sums by the convolution in float64,
    and ROW_SUM_MARGIN absorbs the difference); in the kernel's dtype with autocast disabled, so
    mixed precision never lowers the precision of the constraint.
    """
    with _autocast_off(kernel.device):
        return _weighted_row_sums(abs_correlation_sums(kernel), weights)


def sound_row_sums(kernel: Tensor, weights: Tensor | None = None) -> Tensor:
    """Float64 upper bounds of the *exact* :func:`correlation_row_sums`, ``kernel`` and
    ``weights`` taken as exact values.

    Computed on the CPU by :func:`kernel_self_correlation`, one matrix product over the pairs of
    taps: each correlation entry is a sum of n = c_out kh kw terms (nested at most c_out + kh kw
    deep) with rounding error <= gamma_n sum |terms| (Higham eq. 3.5), at most (s - 1) times the
    correlation of |K| (s = :func:`rounding_safety`). That term is added, then the row sum of
    nonnegative terms is enlarged by its own safety factor.
    """
    kernel = kernel.detach().to("cpu", torch.float64)
    if weights is not None:
        weights = weights.detach().to("cpu", torch.float64)
    c_out, c_in, kh, kw = kernel.shape

    def row_sums(k: Tensor) -> Tensor:
        return _weighted_row_sums(kernel_self_correlation(k).abs().sum(dim=(-2, -1)), weights)

    dot_safety = rounding_safety(torch.float64, c_out * kh * kw)
    cancellation = (dot_safety - 1) * dot_safety * row_sums(kernel.abs())
    row_safety = rounding_safety(torch.float64, c_in * (2 * kh - 1) * (2 * kw - 1) + 3)
    return (row_sums(kernel) + cancellation) * row_safety


def margin_row_sums(kernel: Tensor, weights: Tensor | None = None) -> Tensor:
    """The row sums the forward uses: (1 + ROW_SUM_MARGIN) r + RESCALE_EPS. Enlarging r keeps
    both AOL's and SLL's conditions valid; the margin absorbs float rounding."""
    return correlation_row_sums(kernel, weights) * (1 + ROW_SUM_MARGIN) + RESCALE_EPS


def schur_scales(kernel: Tensor) -> Tensor:
    """AOL's per-input-channel rescaling d_i = r_i^(-1/2) of ``kernel`` (Thm. 1 / Thm. 2), r from
    :func:`margin_row_sums`; given ``kernel.transpose(0, 1)``, the per-output-channel one."""
    return torch.rsqrt(margin_row_sums(kernel))


class AOLConstraint(BoundedWeightConstraint):
    """AOL rescaling of a linear weight ``(out, in)`` or a kernel ``(out, in, kh, kw)``.

    ``rescale`` picks the side: "input" is W -> W D (Thm. 1 on W), "output" is W -> D' W (Thm. 1
    on W^T, see the module docstring), "auto" is "output" when out < in (the cheaper Gram), else
    "input". (On the :func:`orthogonal_centre_` init both sides are the identity when out < in;
    when out > in only "input" is, "output" then starts at norm ~0.45 for 64 -> 128.)
    ``operator_bound`` is the weighted Schur test (weights p_j = 1/d_j, the scales the
    forward uses) on the float64 values of the constrained weight W' itself, on the same side's
    Gram (W'^T W' or W' W'^T, both of norm ||W'||^2), with the rounding of that float64
    computation covered by :func:`sound_row_sums`: sqrt(max_i sum_j |Gram_ij| p_j/p_i). W' is
    first divided by :func:`~lipcert.bounds.operator.power_of_two_scale` (exact): its largest
    entry in [1, 2) keeps the largest row sum >= 1, so products that underflow (all of them for
    float64 weights ~1e-300, which gave a bound of 0.0 against a norm of 1e-294) stay far inside
    the rounding slack, and no square overflows.
    """

    def __init__(self, rescale: str = "input") -> None:
        super().__init__()
        if rescale not in RESCALE_SIDES:
            raise ValueError(f"rescale must be one of {RESCALE_SIDES}, got {rescale!r}")
        self.rescale = rescale

    def extra_repr(self) -> str:
        return f"rescale={self.rescale!r}"

    def rescales_output(self, weight: Tensor) -> bool:
        """Whether the scales go on the output channels (dim 0) of ``weight``."""
        if self.rescale == "auto":
            return weight.shape[0] < weight.shape[1]
        return self.rescale == "output"

    def gram_kernel(self, weight: Tensor) -> Tensor:
        """The kernel whose input-channel Gram gives the scales: W, or W^T on the output side."""
        kernel = as_kernel(weight)
        return kernel.transpose(0, 1) if self.rescales_output(weight) else kernel

    def constrain(self, weight: Tensor) -> Tensor:
        scales = schur_scales(self.gram_kernel(weight))
        shape = [1] * weight.dim()
        shape[0 if self.rescales_output(weight) else 1] = -1
        return weight * scales.view(shape)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        with torch.no_grad():
            weights = 1 / schur_scales(self.gram_kernel(original(layer).detach()))
        if not (torch.isfinite(weight).all() and torch.isfinite(weights).all()):
            return math.inf
        power = power_of_two_scale(weight.double())  # exact; the bound is homogeneous in W'
        rows = sound_row_sums(self.gram_kernel(weight.double() / power), weights.double())
        return math.sqrt(float(rows.max())) * float(power) * rounding_safety(torch.float64, 1)


def partial_isometry_(matrix: Tensor) -> Tensor:
    """Fill ``matrix`` (rows, cols) in place with a random matrix that AOL leaves unchanged.

    rows >= cols: orthonormal columns (W^T W = I). rows < cols: every column is a basis vector of
    a random orthonormal basis of R^rows, each used by floor/ceil(cols/rows) columns scaled by
    1/sqrt(count); then W^T W has unit absolute row sums and W W^T = I. This is the
    "repeated orthogonal" initialization of the AOL reference code, with balanced counts.
    """
    rows, cols = matrix.shape
    if rows >= cols:
        return nn.init.orthogonal_(matrix)
    basis = nn.init.orthogonal_(torch.empty(rows, rows, dtype=matrix.dtype, device=matrix.device))
    groups = torch.randperm(cols, device=matrix.device) % rows  # every basis vector used
    counts = torch.bincount(groups, minlength=rows).to(matrix.dtype)
    with torch.no_grad():
        return matrix.copy_(basis[:, groups] / counts[groups].sqrt())


def orthogonal_centre_(kernel: Tensor) -> Tensor:
    """AOL initialization, after the authors' reference code (berndprach/AOL, initializers
    "orthogonal_center" for convolutions and "repeated_orthogonal" for dense layers): the spatial
    centre of the kernel is a :func:`partial_isometry_` (also when out < in, our choice), every
    other entry zero, so the layer starts orthogonal and the rescaling starts as the identity.
    """
    with torch.no_grad():
        kernel.zero_()
        centre = tuple((size - 1) // 2 for size in kernel.shape[2:])
        partial_isometry_(kernel[(slice(None), slice(None), *centre)])  # (out, in)
    return kernel


class AOLLinear(ConstrainedLinear):
    """``nn.Linear`` with AOL rescaling (Prach & Lampert 2022, Thm. 1): ||W D||_2 <= 1, or, with
    ``rescale="output"`` (or "auto" and out < in), ||D' W||_2 = ||W^T D'||_2 <= 1 (Thm. 1 on W^T).

    ``rescale`` (see :class:`AOLConstraint`) is a constructor argument, not part of the
    state_dict: a checkpoint loads into a layer built with the same ``rescale``, like ``stride``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: str = "input",
    ) -> None:
        constraint = AOLConstraint(rescale)
        super().__init__(in_features, out_features, bias, device, dtype, constraint=constraint)

    def init_weight(self, weight: Tensor) -> None:
        orthogonal_centre_(weight)


class AOLConv2d(ConstrainedConv2d):
    """``nn.Conv2d`` with AOL's per-channel rescaling (Prach & Lampert 2022, Thm. 2).

    ``rescale="input"`` (default) scales the input channels, A D; "output" scales the output
    channels, D' A, from the Gram A A^T of the adjoint (Thm. 1 on A^T, see the module docstring);
    "auto" takes "output" when out_channels < in_channels, where it is cheaper. ``rescale`` is a
    constructor argument, not part of the state_dict: a checkpoint loads into a layer built with
    the same ``rescale``, like ``stride``. The bound holds for any stride and for zero or circular
    padding, on either side:

    * a stride-s convolution is the stride-1 one followed by subsampling, a coordinate projection
      of norm <= 1, so ||A_s D|| <= ||A_1 D||; a per-output-channel D' commutes with it,
      D'_s A_s = (subsampling) D'_1 A_1, so ||D'_s A_s|| <= ||D'_1 A_1||;
    * a zero-padded convolution is (crop) o (convolution on a grid enlarged by the padding) o
      (zero-embedding), both of norm 1; a circular one (2 * padding <= kernel_size - 1) is a
      crop of a circular convolution, whose Gram (A^T A or A A^T) on a small grid sums several
      correlation offsets into one entry, which by the triangle inequality only lowers the
      absolute row sums. D' commutes with the crop as with subsampling; the bias-free part is
      the whole Lipschitz map, the bias only shifts the output.

    Larger circular padding repeats input pixels and is refused, as are reflect/replicate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: str = "input",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            bias,
            padding_mode,
            device,
            dtype,
            constraint=AOLConstraint(rescale),
        )

    def init_weight(self, weight: Tensor) -> None:
        orthogonal_centre_(weight)
