"""Spectrally normalized Linear and Conv2d layers, divided by a *sound* bound of their norm.

Spectral normalization (Miyato et al., "Spectral Normalization for Generative Adversarial
Networks", ICLR 2018, Eq. 8) uses W / sigma(W) with sigma estimated by power iteration. Power
iteration converges to sigma *from below*, so W / sigma_estimate can have norm above 1. Here the
divisor is an upper bound instead: Gram iteration for matrices (Delattre et al., ICML 2023, Alg. 1)
and the symbol bound of :func:`~lipcert.bounds.conv.conv2d_operator_bound` for convolutions, both
with float rounding accounted for. Dividing by B >= ||W||_2 gives ||W / B||_2 <= 1 exactly, and the
bounds are tight (within their documented slack), so the layers stay close to norm 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipcert.bounds.conv import (
    DEFAULT_CONV_GRAM_ITERATIONS,
    DEFAULT_GRID_SLACK,
    conv2d_operator_bound,
    to_pair,
)
from lipcert.bounds.operator import DEFAULT_GRAM_ITERATIONS, gram_spectral_bound
from lipcert.nn.constrained import (
    BoundedWeightConstraint,
    ConstrainedConv2d,
    ConstrainedLinear,
    layer_name,
)


class SpectralNormalization(BoundedWeightConstraint):
    """W -> W / B(W), B the Gram-iteration upper bound of sigma_1(W) (Miyato et al. 2018, Eq. 8)."""

    def __init__(self, n_iter: int = DEFAULT_GRAM_ITERATIONS) -> None:
        super().__init__()
        self.n_iter = n_iter

    def constrain(self, weight: Tensor) -> Tensor:
        return weight / gram_spectral_bound(weight, self.n_iter)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        return float(gram_spectral_bound(weight, self.n_iter))


class ConvSpectralNormalization(BoundedWeightConstraint):
    """K -> K / B(K), B a sound bound of the convolution's norm at every input size.

    ``stride`` is the stride the bound may assume (1 for circular padding: see
    :mod:`lipcert.bounds.conv`).
    """

    def __init__(
        self,
        stride: tuple[int, int] = (1, 1),
        grid_slack: float = DEFAULT_GRID_SLACK,
        n_iter: int = DEFAULT_CONV_GRAM_ITERATIONS,
    ) -> None:
        super().__init__()
        self.stride, self.grid_slack, self.n_iter = stride, grid_slack, n_iter

    def _bound(self, kernel: Tensor) -> Tensor:
        return conv2d_operator_bound(kernel, self.stride, self.grid_slack, self.n_iter)

    def constrain(self, weight: Tensor) -> Tensor:
        return weight / self._bound(weight)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        """The divisor's bound, refused for a layer whose stride or padding mode changed after
        construction to one the bound does not cover: the stride-1 bound covers every stride,
        a strided one only zero padding at that stride."""
        strided = self.stride != (1, 1)
        if strided and (layer.padding_mode != "zeros" or tuple(layer.stride) != self.stride):
            raise ValueError(
                f"the bound of {layer_name(layer)} assumes stride {self.stride} with zero "
                f"padding; the layer now has stride {layer.stride}, padding_mode "
                f"{layer.padding_mode!r}: build a new layer"
            )
        return float(self._bound(weight))


class SpectralLinear(ConstrainedLinear):
    """``nn.Linear`` whose weight is W / B(W), B >= sigma_1(W) (spectral normalization, sound).

    Miyato et al. (ICLR 2018), Eq. 8, with the power-iteration estimate (a lower bound of sigma_1)
    replaced by the Gram-iteration upper bound (Delattre et al., ICML 2023), so ||W / B||_2 <= 1.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, device, dtype, constraint=SpectralNormalization()
        )


class SpectralConv2d(ConstrainedConv2d):
    """``nn.Conv2d`` whose kernel is K / B(K), B >= the convolution's l2 norm at every input size.

    Miyato et al. (ICLR 2018), Eq. 8, for convolutions, with the divisor an upper bound of the
    norm of the *convolution operator* (not of the reshaped kernel matrix, which is not a bound):
    the symbol bound of :func:`~lipcert.bounds.conv.conv2d_operator_bound`. With zero padding the
    bound uses the stride (a strided convolution can have a smaller norm); with circular padding
    it assumes stride 1, which holds for every input size.
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
    ) -> None:
        to_pair("kernel_size", kernel_size)  # validates it: a ValueError naming the argument
        bound_stride = to_pair("stride", stride) if padding_mode == "zeros" else (1, 1)
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
            constraint=ConvSpectralNormalization(bound_stride),
        )
