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

import math

import torch
from torch import Tensor, nn

from lipcert.bounds.operator import power_of_two_scale, rounding_safety
from lipcert.nn.constrained import (
    BoundedWeightConstraint,
    ConstrainedConv2d,
    ConstrainedLinear,
)
from lipcert.nn.constraint import original
from lipcert.nn.correlation import abs_correlation_sums, kernel_self_correlation
from lipcert.precision import autocast_off

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
    with autocast_off(kernel.device):
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
