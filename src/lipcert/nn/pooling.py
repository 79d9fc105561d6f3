"""Stateless pooling and downsampling layers that are 1-Lipschitz in l2.

* :class:`ScaledAvgPool2d`: y_w = (1 / sqrt(kh kw)) sum_{p in w} x_p, i.e. average pooling times
  sqrt(kh kw). Each output is the inner product of its window with a unit vector.
* :class:`L2NormPool2d`: y_w = sqrt(sum_{p in w} x_p^2 + eps), the l2-norm pooling of Boureau,
  Ponce & LeCun (ICML 2010) with a smoothing eps. v -> sqrt(||v||^2 + eps) = ||(v, sqrt(eps))|| is
  1-Lipschitz and its gradient v / sqrt(||v||^2 + eps) has norm < 1 and is 0 (not NaN) at v = 0.
* :class:`InvertibleDownsample`: space-to-depth (pixel unshuffle), the invertible downsampling of
  Jacobsen, Smeulders & Oyallon (i-RevNet, ICLR 2018): a permutation of the coordinates.

Why the pools are 1-Lipschitz: with windows that do not overlap, the Jacobian rows of different
outputs have disjoint supports and norms <= 1, so J J^T is diagonal with entries <= 1 and
||J||_2 <= 1. With overlapping windows (stride < kernel) a pixel feeds up to
ceil(kh/sh) * ceil(kw/sw) windows and the constant grows up to the square root of that count: both
pools *refuse* such strides (ValueError) instead of carrying a constant above 1, so every layer
here composes with lipcert's 1-Lipschitz layers as is. A stride larger than the kernel (gaps between
windows) is fine. Pixels beyond the last full window are dropped, as in ``nn.AvgPool2d``; no
padding and no ``ceil_mode`` (a partial window would scale a single pixel by sqrt(kh kw)).

``kernel_size=None`` pools the whole map (``(B, C, H, W) -> (B, C, 1, 1)``), the global head of
SLL / orthogonium networks. The float arithmetic of the pools (a sum and a scale) is left to the
rounding safety of the certificate, like the arithmetic of every other layer.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipcert.nn.constraint import LipschitzLayer

#: Default eps of L2NormPool2d: offsets the output of an all-zero window by sqrt(eps) = 1e-6 (below
#: the 1e-5 tolerance of export checks) and bounds the intermediate 1 / (2 sqrt(s + eps)) of the
#: backward by 5e5; with eps = 0 the gradient at an all-zero window is NaN (as in nn.LPPool2d).
DEFAULT_L2_POOL_EPS = 1e-12

Pair = tuple[int, int]


def _as_pair(value: int | tuple[int, int], name: str) -> Pair:
    """``value`` as a pair of positive ints, or a ValueError naming ``name``."""
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _check_feature_map(layer: nn.Module, x: Tensor) -> None:
    """A (B, C, H, W) or (C, H, W) input, or a ValueError naming ``layer`` and both shapes."""
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{layer}: expected a (B, C, H, W) or (C, H, W) input, got {tuple(x.shape)}"
        )


def _map_size(x: Tensor) -> Pair:
    """(H, W) of ``x`` as ints (an ONNX trace has a fixed H and W: they become constants there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(x.shape[-2]), int(x.shape[-1])


def _check_disjoint_windows(kernel: Pair, stride: Pair) -> None:
    """ValueError unless windows of ``kernel`` at ``stride`` never overlap."""
    if stride[0] < kernel[0] or stride[1] < kernel[1]:
        uses = math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1])
        raise ValueError(
            f"stride={stride} is smaller than kernel_size={kernel}: overlapping windows use a "
            f"pixel up to {uses} times, so the layer would not be 1-Lipschitz (constant up to "
            f"sqrt({uses})); use stride >= kernel_size"
        )


def _check_eps(eps: object) -> None:
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


class _WindowPool2d(LipschitzLayer, nn.Module):
    """Validation and window logic shared by the two pools (non-overlapping windows only)."""

    allocates_output = True  # a pooled map, rescaled or square-rooted

    def __init__(
        self, kernel_size: int | tuple[int, int] | None, stride: int | tuple[int, int] | None
    ) -> None:
        super().__init__()
        if kernel_size is None:
            if stride is not None:
                raise ValueError(
                    f"stride must be None when kernel_size is None (global pooling), got {stride!r}"
                )
            self.kernel_size, self.stride = None, None
            return
        kernel = _as_pair(kernel_size, "kernel_size")
        step = kernel if stride is None else _as_pair(stride, "stride")
        _check_disjoint_windows(kernel, step)
        self.kernel_size, self.stride = kernel, step

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

    def _window(self, x: Tensor) -> tuple[Pair, Pair]:
        """(kernel, stride) for the input ``x``: the whole map for global pooling.

        The input checks are skipped while tracing (ONNX export), where they would become graph ops.
        """
        if not torch.jit.is_tracing():
            self._check_input(x)
        if self.kernel_size is None:
            whole = _map_size(x)
            return whole, whole
        return self.kernel_size, self.stride

    def _check_input(self, x: Tensor) -> None:
        _check_feature_map(self, x)
        if x.shape[-2] == 0 or x.shape[-1] == 0:  # a global window of 0 pixels: 0 / 0
            raise ValueError(f"{self}: input of shape {tuple(x.shape)} has an empty feature map")
        if self.kernel_size is not None and (
            x.shape[-2] < self.kernel_size[0] or x.shape[-1] < self.kernel_size[1]
        ):
            raise ValueError(
                f"{self}: input of shape {tuple(x.shape)} is smaller than the window "
                f"{self.kernel_size}"
            )

    def lipschitz_bound(self) -> float:
        """Exactly 1 (in l2) whenever the output is not empty: see the module docstring. The
        windows are checked again (the forward reads them at every call: a stride set below the
        kernel after construction gave a norm of 1.87 under this bound)."""
        if self.kernel_size is not None:
            kernel = _as_pair(self.kernel_size, "kernel_size")
            stride = kernel if self.stride is None else _as_pair(self.stride, "stride")
            _check_disjoint_windows(kernel, stride)
        return 1.0

    def export(self) -> nn.Module:
        """Stateless: the layer itself is its export (ONNX: AveragePool, or ReduceSum for a
        window over the whole map, and elementwise ops)."""
        return self


class ScaledAvgPool2d(_WindowPool2d):
    """Average pooling times sqrt(kh kw): 1-Lipschitz in l2 with stride >= kernel_size.

    y_w = (1 / sqrt(kh kw)) sum_{p in w} x_p; its Jacobian has orthonormal rows, so it also
    preserves the norm of the gradients it sends back. ``kernel_size=None`` pools the whole map.
    Its windows' sums are sqrt(kh kw) times its output (``output_root``: 1), and overflow
    float32 first (64 entries of 6e36).
    """

    output_root = 1.0

    def __init__(
        self, kernel_size: int | tuple[int, int] | None, stride: int | tuple[int, int] | None = None
    ) -> None:
        super().__init__(kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        kernel, stride = self._window(x)
        scale = math.sqrt(kernel[0] * kernel[1])
        if tuple(kernel) == tuple(x.shape[-2:]):  # one window, the whole map: a plain sum
            # ~4x faster than avg_pool2d (CPU); half precision summed in float32 (a float16 sum
            # overflows at 65504 where the pooled value, sqrt(kh kw) times smaller, does not)
            work = x.to(torch.promote_types(x.dtype, torch.float32))
            return (work.sum(dim=(-2, -1), keepdim=True) / scale).to(x.dtype)
        return F.avg_pool2d(x, kernel, stride) * scale


class L2NormPool2d(_WindowPool2d):
    """sqrt(sum over the window of x^2 + eps): 1-Lipschitz in l2 with stride >= kernel_size.

    Boureau, Ponce & LeCun (ICML 2010) l2 pooling, smoothed by ``eps >= 0`` so that the gradient
    at an all-zero window is 0 rather than NaN. Half-precision inputs are squared and summed in
    float32 (x^2 overflows float16 above 256, and eps would round to 0); the output keeps the input
    dtype. ``kernel_size=None`` pools the whole map. The squares underflow long before x does
    (``output_root``): with eps = 0, (1e-22 x)^2 rounds to 0 or 2^-149 and the output, scaled
    back by 1e22, jumped from 0 to 0.75 between x = 0.59 and 0.595, where a radius of 0.32
    was certified.
    """

    output_root = 2.0

    def __init__(
        self,
        kernel_size: int | tuple[int, int] | None,
        stride: int | tuple[int, int] | None = None,
        eps: float = DEFAULT_L2_POOL_EPS,
    ) -> None:
        super().__init__(kernel_size, stride)
        _check_eps(eps)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"

    def lipschitz_bound(self) -> float:
        """1, with eps checked again: sqrt(s + eps) with eps < 0 (set after construction) has an
        unbounded slope near s = -eps (7.1 under this bound)."""
        _check_eps(self.eps)
        return super().lipschitz_bound()

    def forward(self, x: Tensor) -> Tensor:
        kernel, stride = self._window(x)
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        sums = F.avg_pool2d(work.square(), kernel, stride) * (kernel[0] * kernel[1])
        return sums.add(self.eps).sqrt().to(x.dtype)


class InvertibleDownsample(LipschitzLayer, nn.Module):
    """Space-to-depth by ``factor``: (B, C, H, W) -> (B, C f^2, H / f, W / f).

    The invertible downsampling of i-RevNet (Jacobsen et al., ICLR 2018): every output is one input
    pixel, so the map is a permutation (orthogonal, Lipschitz constant exactly 1 in every l_p).
    Exports to ``nn.PixelUnshuffle(factor)``; H and W must be multiples of ``factor``.
    """

    #: A permutation of coordinates: 1-Lipschitz (an isometry) in every l_p norm.
    lipschitz_norm = "any"

    def __init__(self, factor: int = 2) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        super().__init__()
        self.factor = factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():
            _check_feature_map(self, x)
            if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
                raise ValueError(
                    f"{self}: input of shape {tuple(x.shape)} has a height or width that is not "
                    f"a multiple of factor={self.factor}"
                )
        return F.pixel_unshuffle(x, self.factor)

    def lipschitz_bound(self) -> float:
        """Exactly 1: a permutation of the coordinates."""
        return 1.0

    def export(self) -> nn.PixelUnshuffle:
        return nn.PixelUnshuffle(self.factor)
