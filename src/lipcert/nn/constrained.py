"""Linear and convolution layers whose weight goes through a :class:`WeightConstraint`.

They keep torch's constructors (``nn.Linear`` / ``nn.Conv2d`` signatures) plus a ``constraint``;
the families (spectral, AOL, orthogonal) are thin subclasses that choose it. ``forward`` stays the
plain op on ``self.weight``, which ``torch.nn.utils.parametrize`` computes through the constraint.
Export is "keep the values, drop the parametrization".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipcert.bounds.padded_conv import forward_pads
from lipcert.nn.constraint import LipschitzLayer, WeightConstraint, original

#: Padding modes under which a convolution is a restriction of a circular one (so circular-norm
#: bounds hold). "reflect" and "replicate" reuse input pixels and may raise the Lipschitz constant.
SUPPORTED_PADDING_MODES = ("zeros", "circular")


class BoundedWeightConstraint(WeightConstraint):
    """A constraint that can also bound, soundly and in float64, the operator of its output."""

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        raise NotImplementedError


def _init_torch_default(weight: Tensor, bias: Tensor | None) -> None:
    """torch's default init for Linear/Conv (kaiming_uniform with a = sqrt(5))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class _ConstrainedMixin(LipschitzLayer):
    """Shared parts of the constrained Linear/Conv2d layers."""

    def _register(self, constraint: BoundedWeightConstraint) -> None:
        # unsafe: no trial evaluation of the constraint at registration (a sound conv bound or
        # 15 Björck steps, seconds for large layers); constraints keep shape and dtype.
        parametrize.register_parametrization(self, "weight", constraint, unsafe=True)

    @property
    def constraint(self) -> BoundedWeightConstraint:
        """The weight's constraint; a ValueError once ``remove_parametrizations`` took it off (an
        AttributeError here would reach the caller as "no attribute 'constraint'"): the layer
        then computes with a plain weight (the raw one with ``leave_parametrized=False``: an
        AOL layer at norm 5.0) that no family bound covers."""
        if not parametrize.is_parametrized(self, "weight"):
            raise ValueError(
                f"{layer_name(self)} has no weight constraint (removed by "
                "remove_parametrizations?): bound its export() instead"
            )
        return self.parametrizations.weight[0]

    def init_weight(self, weight: Tensor) -> None:
        """Initialize the unconstrained weight in place (families override)."""
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _init_torch_default(original(self), self.bias)
            self.init_weight(original(self))

    def constrained_weight(self) -> Tensor:
        """The weight the forward uses, computed without the eval cache's mode switch."""
        with torch.no_grad():
            return self.weight.detach().clone()

    def lipschitz_bound(self) -> float:
        return self.constraint.operator_bound(self, self.constrained_weight().double())


class ConstrainedLinear(_ConstrainedMixin, nn.Linear):
    """``nn.Linear`` with a weight constraint."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        constraint: BoundedWeightConstraint,
    ) -> None:
        _check_positive(in_features=in_features, out_features=out_features)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._register(constraint)

    def forward(self, input: Tensor) -> Tensor:
        ok = input.dim() >= 1 and input.shape[-1] == self.in_features
        check_input_shape(self, input, f"(*, {self.in_features})", ok)
        return super().forward(input)

    def export(self) -> nn.Linear:
        plain = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.bias.device if self.bias is not None else None,
            dtype=original(self).dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(self.constrained_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class ConstrainedConv2d(_ConstrainedMixin, nn.Conv2d):
    """``nn.Conv2d`` with a weight constraint (dilation 1, one group, zeros/circular padding)."""

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
        constraint: BoundedWeightConstraint,
    ) -> None:
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        _check_padding_mode(padding_mode)
        if padding == "same" and stride not in (1, (1, 1)):
            raise ValueError(
                "padding='same' needs stride=1; give an integer padding for stride > 1"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        check_conv_geometry(self)
        self._register(constraint)

    def forward(self, input: Tensor) -> Tensor:
        ok = input.dim() in (3, 4) and input.shape[-3] == self.in_channels
        check_input_shape(self, input, f"(B, {self.in_channels}, H, W)", ok)
        return super().forward(input)

    def lipschitz_bound(self) -> float:
        check_conv_geometry(self)  # nn.Conv2d reads its settings at every forward
        return super().lipschitz_bound()

    def export(self) -> nn.Conv2d:
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=original(self).device,
            dtype=original(self).dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(self.constrained_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def layer_name(layer: nn.Module) -> str:
    """The class name a user gave ``layer`` (parametrize renames it ``Parametrized...``)."""
    return type(layer).__name__.removeprefix("Parametrized")


def check_input_shape(layer: nn.Module, x: Tensor, expected: str, ok: bool) -> None:
    """Raise a ValueError naming ``layer``, the ``expected`` shape and the shape of ``x``."""
    if not ok:
        raise ValueError(f"{layer_name(layer)} expects input {expected}, got {tuple(x.shape)}")


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in SUPPORTED_PADDING_MODES:
        raise ValueError(
            f"padding_mode={padding_mode!r} is not supported: reflect/replicate padding reuses "
            f"input pixels; use one of {SUPPORTED_PADDING_MODES}"
        )


def check_conv_geometry(conv: nn.Conv2d) -> None:
    """ValueError unless ``conv`` is a convolution the constrained layers' bounds cover: zero or
    circular padding, dilation 1, one group, and circular padding of at most k - 1 in all per
    axis (more wraps the input more than once and repeats outputs, so the layer is no longer a
    restriction of a circular convolution, nor bounded by it). Checked when the layer is built
    and at every bound: ``nn.Conv2d`` reads these attributes at every forward, and one changed
    afterwards (a replicate ``padding_mode`` set on an AOL layer: norm 2.0 against a bound of 1.0)
    would run a convolution the bound does not cover."""
    _check_padding_mode(conv.padding_mode)
    if tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise ValueError(
            f"{layer_name(conv)} needs dilation 1 and one group, got dilation={conv.dilation}, "
            f"groups={conv.groups}"
        )
    if conv.padding_mode != "circular":
        return
    totals = [before + after for before, after in forward_pads(conv)]
    if any(total > k - 1 for total, k in zip(totals, conv.kernel_size, strict=True)):
        raise ValueError(
            f"circular padding of {totals} in all per axis must be at most kernel_size - 1 "
            f"(kernel_size={conv.kernel_size}): more repeats outputs and can raise the norm"
        )


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
