"""Input normalization as the first layer of a certified model.

``Normalize(mean, std)`` computes ``(x - mean) / std`` per channel (dimension 1). Keeping it inside
the model means certified radii are measured in the user's input space (pixels in [0, 1]), and the
normalization's own Lipschitz constant enters the bound: the map is affine with the diagonal linear
part diag(1 / std), whose operator norm, in l2 as in every l_p, is exactly 1 / min(std).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipcert.bounds.network import register_internal_growth
from lipcert.nn.constraint import LipschitzLayer


def _as_vector(name: str, value: float | Sequence[float] | Tensor) -> Tensor:
    vector = torch.as_tensor(value, dtype=torch.float64).detach().reshape(-1)
    if vector.numel() == 0:
        raise ValueError(f"{name} must hold one value a channel, got none")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name} must be finite, got {vector.tolist()}")
    return vector


class Normalize(LipschitzLayer, nn.Module):
    """``(x - mean) / std`` over channel dimension 1; one value each, or a single shared value.

    ``lipschitz_bound()`` is 1 / min(std) of the stored (``dtype``-rounded) std, computed in
    float64 and rounded up by one ulp: the exact constant of the map, made an upper bound.
    """

    def __init__(
        self,
        mean: float | Sequence[float] | Tensor,
        std: float | Sequence[float] | Tensor,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        mean_vec, std_vec = _as_vector("mean", mean), _as_vector("std", std)
        if mean_vec.numel() != std_vec.numel():
            raise ValueError(
                f"mean and std must have one value a channel each, got {mean_vec.numel()} "
                f"and {std_vec.numel()}"
            )
        if (std_vec <= 0).any():
            raise ValueError(f"std must be positive (it divides), got {std_vec.tolist()}")
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("mean", mean_vec.to(device=device, dtype=dtype))
        self.register_buffer("std", std_vec.to(device=device, dtype=dtype))

    @classmethod
    def from_data(cls, x: Tensor) -> Normalize:
        """Per-channel mean and (population) std of the inputs ``x`` ``(N, C, ...)``."""
        if x.dim() < 2:
            raise ValueError(f"Normalize.from_data expects (N, C, ...), got {tuple(x.shape)}")
        per_channel = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * ...)
        return cls(per_channel.mean(dim=1), per_channel.std(dim=1, correction=0), dtype=x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        channels = self.mean.numel()
        if x.dim() < 2 or (channels > 1 and x.shape[1] != channels):
            raise ValueError(
                f"Normalize expects inputs (N, {channels}, ...), got shape {tuple(x.shape)}"
            )
        shape = (-1, *([1] * (x.dim() - 2)))  # (C, 1, ..., 1): broadcast over (N, C, ...)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def lipschitz_bound(self) -> float:
        """1 / min |std|, rounded up; ValueError for a std of 0 (or NaN), which the constructor
        refuses but ``load_state_dict`` can bring (a negative std only flips a sign: 1 / |std|;
        1 / min(std) read -0.1 for std (-10, 0.01), a bound of the wrong sign)."""
        smallest = float(self.std.double().abs().min())
        if not smallest > 0:
            raise ValueError(f"Normalize has std {self.std.tolist()}: a std of 0 has no bound")
        return math.nextafter(1.0 / smallest, math.inf)

    def export(self) -> nn.Module:
        """Itself: the forward is plain torch ops on buffers."""
        return self

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


@register_internal_growth(Normalize)
def _centred_internal_growth(module: nn.Module, norm: str) -> tuple[float, float]:
    """x - mean: at most max |mean| + ||h|| entrywise, in either norm; dividing by std gives the
    output. A large mean over a large std cancels: mean -3e38, std 1e30 gave outputs ~3e8
    around 0 while x - mean is inf from x = 4e37."""
    return float(module.mean.detach().abs().max()), 1.0
