"""SDP-based Lipschitz Layers (Araujo et al., ICLR 2023, "A Unified Algebraic Perspective on
Lipschitz Neural Networks", Thm. 3).

h(x) = x - 2 W T^-1 relu(W^T x + b) with T = diag(t), t_i = sum_j |W^T W|_ij q_j / q_i, q > 0
(learned as q = exp(log_q)). W^T x is ``linear(x, K)`` / ``conv2d(x, K)`` with the stored weight
K = W^T of shape (inner, features[, k, k]); W is the transposed map. Why it is 1-Lipschitz:
h(x) - h(y) = (I - 2 W T^-1 L W^T)(x - y) with L diagonal in [0, 1] (ReLU slopes), a symmetric
matrix with eigenvalues in [-1, 1] as soon as T >= W^T W, and T - W^T W is positive semidefinite
because Q (T - W^T W) Q, Q = diag(q), is diagonally dominant with a nonnegative diagonal
(Gershgorin). For convolutions W^T W is the block-Toeplitz Gram whose entries are the kernel
self-correlation (:func:`lipcert.nn.correlation.kernel_self_correlation`); zero 'same' padding is a
crop of the convolution on a larger grid, which only sets some slopes of L to 0.

The forward folds 2 T^-1 into the outer weight: B = C K with C = diag(c), c_i = 2 / t'_i,
t'_i = (1 + margin) t_i + eps (:func:`lipcert.nn.aol.margin_row_sums`): eps gives an all-zero unit
a finite c_i, the margin absorbs float rounding of t. Both only enlarge T, and
T' >= T >= W^T W keeps the argument above intact. :func:`residual_bound` then checks the float
weights actually used, in float64 (:func:`lipcert.nn.residual.residual_bound`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lipcert.bounds.network import (
    internal_size,
    register_internal_growth,
    register_internal_size,
)
from lipcert.nn.aol import as_kernel, margin_row_sums
from lipcert.nn.constrained import _check_positive, check_input_shape
from lipcert.nn.constraint import EvalCache, LipschitzLayer, plain_settings
from lipcert.nn.residual import Residual, residual_bound, sll_internal_growth
from lipcert.precision import ieee_float32

#: Range of log q kept below its maximum: q_j / q_i stays within e^(+-20), so T and its gradients
#: stay finite in float32 (with kernels up to ~1e3). A unit clamped at the bottom has a t_i about
#: e^20 times its Gershgorin sum, i.e. it is silenced; any positive q keeps Thm. 3 valid.
LOG_Q_RANGE = 20.0


def q_weights(log_q: Tensor) -> Tensor:
    """q = exp(log_q) up to a common factor (which t ignores), clamped to [e^-LOG_Q_RANGE, 1]."""
    return torch.exp((log_q - log_q.max()).clamp_min(-LOG_Q_RANGE))


def sll_scales(kernel: Tensor, log_q: Tensor) -> Tensor:
    """c_i = 2 / t'_i for ``kernel`` K = W^T of shape (inner, features, kh, kw) (Thm. 3)."""
    return 2 / margin_row_sums(kernel.transpose(0, 1), q_weights(log_q))  # rows of W^T W


class _SLL(LipschitzLayer, nn.Module):
    """Parameters, folding, eval cache, bound and export shared by the SLL layers.

    Subclasses give the two maps: ``_inner(x)`` = W^T x + b and ``_outer(z, B)`` = B^T z, and their
    plain-module versions.
    """

    def __init__(
        self,
        features: int,
        inner: int,
        kernel_size: tuple[int, ...],
        bias: bool,
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner, features, *kernel_size, **factory))
        bias_param = nn.Parameter(torch.empty(inner, **factory)) if bias else None
        self.register_parameter("bias", bias_param)
        self.log_q = nn.Parameter(torch.empty(inner, **factory))
        self.cache = EvalCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Araujo et al.'s reference init: Xavier-normal K, uniform(+-1/sqrt(fan_in)) bias. Their
        code draws q at random; q = 1 here, where T starts as the plain Gershgorin sum of W^T W."""
        nn.init.xavier_normal_(self.weight)
        nn.init.zeros_(self.log_q)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def fold(self) -> tuple[Tensor, Tensor]:
        """(c, B): the scales c = 2 / t' and the folded outer weight B = diag(c) K (IEEE float32
        on CUDA: see :mod:`lipcert.precision`)."""
        with ieee_float32():
            scales = sll_scales(as_kernel(self.weight), self.log_q)
        return scales, self.weight * scales.view(-1, *([1] * (self.weight.dim() - 1)))

    def folded(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(K, c, B, q): the kernel, scales, outer weight and q weights the forward uses. Computed
        afresh in training; in eval mode computed once and cached on the raw tensors (weight,
        log_q), with K copied: the forward, :meth:`lipschitz_bound` and :meth:`export` then use
        one consistent set even after a write that bumps no version counter (``weight.data``),
        where a live K beside a cached B would be no SLL layer at all."""
        sources = [self.weight, self.log_q]
        return self.cache.get(sources, self._fold_all, not self.training, plain_settings(self))

    def precompute(self) -> None:
        self.folded()

    def _fold_all(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scales, outer = self.fold()
        kernel = self.weight if torch.is_grad_enabled() else self.weight.detach().clone()
        return kernel, scales, outer, q_weights(self.log_q)

    allocates_output = True  # x - (...)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        kernel, _, outer, _ = self.folded()
        return x - self._outer(F.relu(self._inner(x, kernel)), outer)

    def lipschitz_bound(self) -> float:
        with torch.no_grad():
            kernel, scales, outer, weights = self.folded()
            return residual_bound(as_kernel(kernel), as_kernel(outer), scales, weights)

    def export(self) -> Residual:
        """x + (-B^T) relu(W^T x + b) as plain modules; -B is an exact negation."""
        with torch.no_grad():
            kernel, _, outer, _ = self.folded()
            return Residual(
                nn.Sequential(self._plain_inner(kernel), nn.ReLU(), self._plain_outer(-outer))
            )

    def _factory(self) -> dict:
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    def _inner(self, x: Tensor, kernel: Tensor) -> Tensor:
        raise NotImplementedError

    def _outer(self, z: Tensor, outer: Tensor) -> Tensor:
        raise NotImplementedError

    def _plain_inner(self, kernel: Tensor) -> nn.Module:
        raise NotImplementedError

    def _plain_outer(self, weight: Tensor) -> nn.Module:
        raise NotImplementedError


@register_internal_size(_SLL)
def _sll_internal_size(layer: nn.Module, x: Tensor, norm: str) -> float:
    """The pre-activation W^T x + b carried by the outer map, as for the exported layer (the
    same weights: :meth:`_SLL.folded`)."""
    return internal_size(layer.export(), x, norm)


@register_internal_growth(_SLL)
def _sll_internal_growth(layer: nn.Module, norm: str) -> tuple[float, float]:
    """W^T x + b and B^T relu(.) with the weights the forward uses (:meth:`_SLL.folded`)."""
    with torch.no_grad():
        kernel, _, outer, _ = layer.folded()
    return sll_internal_growth(kernel, layer.bias, outer)


class SLLLinear(_SLL):
    """x - 2 W T^-1 relu(W^T x + b) on vectors (Araujo et al. 2023, Thm. 3); W^T: features ->
    inner_features."""

    def __init__(
        self,
        features: int,
        inner_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_positive(features=features, inner_features=inner_features)
        super().__init__(features, inner_features, (), bias, device, dtype)
        self.features, self.inner_features = features, inner_features

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}"

    def _check_input(self, x: Tensor) -> None:
        ok = x.dim() >= 1 and x.shape[-1] == self.features
        check_input_shape(self, x, f"(*, {self.features})", ok)

    def _inner(self, x: Tensor, kernel: Tensor) -> Tensor:
        return F.linear(x, kernel, self.bias)  # (..., inner)

    def _outer(self, z: Tensor, outer: Tensor) -> Tensor:
        return F.linear(z, outer.t())  # (..., features)

    def _plain_inner(self, kernel: Tensor) -> nn.Linear:
        plain = nn.Linear(
            self.features, self.inner_features, self.bias is not None, **self._factory()
        )
        plain.weight.copy_(kernel)
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain

    def _plain_outer(self, weight: Tensor) -> nn.Linear:
        plain = nn.Linear(self.inner_features, self.features, bias=False, **self._factory())
        plain.weight.copy_(weight.t())
        return plain


class SLLConv2d(_SLL):
    """Convolutional SLL (Araujo et al. 2023, Thm. 3): x - 2 W T^-1 relu(W^T x + b) with
    W^T x = conv2d(x, K) and W = conv_transpose2d(., K), K of shape (inner, channels, k, k), odd
    k, zero 'same' padding; T from the self-correlation of K weighted by q."""

    def __init__(
        self,
        channels: int,
        inner_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_positive(channels=channels, inner_channels=inner_channels)
        size = _pair(kernel_size)
        if not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in size):
            raise ValueError(
                f"kernel_size must be odd positive integers ('same' padding), got {kernel_size!r}"
            )
        super().__init__(channels, inner_channels, size, bias, device, dtype)
        self.channels, self.inner_channels, self.kernel_size = channels, inner_channels, size
        self.padding = (size[0] // 2, size[1] // 2)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"kernel_size={self.kernel_size}"
        )

    def _check_input(self, x: Tensor) -> None:
        ok = x.dim() in (3, 4) and x.shape[-3] == self.channels
        check_input_shape(self, x, f"(B, {self.channels}, H, W)", ok)

    def _inner(self, x: Tensor, kernel: Tensor) -> Tensor:
        return F.conv2d(x, kernel, self.bias, padding=self.padding)  # (B, inner, H, W)

    def _outer(self, z: Tensor, outer: Tensor) -> Tensor:
        return F.conv_transpose2d(z, outer, padding=self.padding)  # (B, channels, H, W)

    def _plain_inner(self, kernel: Tensor) -> nn.Conv2d:
        plain = nn.Conv2d(
            self.channels,
            self.inner_channels,
            self.kernel_size,
            padding=self.padding,
            bias=self.bias is not None,
            **self._factory(),
        )
        plain.weight.copy_(kernel)
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain

    def _plain_outer(self, weight: Tensor) -> nn.ConvTranspose2d:
        plain = nn.ConvTranspose2d(
            self.inner_channels,
            self.channels,
            self.kernel_size,
            padding=self.padding,
            bias=False,
            **self._factory(),
        )
        plain.weight.copy_(weight)
        return plain
