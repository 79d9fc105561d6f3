"""The last layer of a certifiable classifier: a Linear layer with unit-norm rows.

Araujo et al., "A Unified Algebraic Perspective on Lipschitz Neural Networks", ICLR 2023 (Sec. 5,
"last layer normalization"): the logits are f_k(x) = <w_k, h(x)> + b_k with ||w_k||_2 = 1 and h an
L_b-Lipschitz body. The margin f_y - f_j is (L_b ||w_y - w_j||)-Lipschitz, so
r(x) = min_{j != y} (f_y(x) - f_j(x)) / (L_b ||w_y - w_j||) is a certified l2 radius (design.md §4).

The layer as a whole is *not* 1-Lipschitz: unit rows give ||W||_2 up to sqrt(out_features).
``lipschitz_bound()`` is therefore the sound spectral bound of the normalized matrix, and
:meth:`RowNormLinear.pairwise_row_distance_bound` gives the sound ||w_i - w_j|| for certificates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipcert.bounds.operator import (
    gram_spectral_bound,
    pairwise_row_distance_bound,
    power_of_two_scale,
)
from lipcert.nn.constrained import BoundedWeightConstraint, ConstrainedLinear


class RowNormalization(BoundedWeightConstraint):
    """W -> each row w_k / ||w_k||_2 (a zero row stays zero).

    Each row is first divided by :func:`~lipcert.bounds.operator.power_of_two_scale` (exact, and
    the map is scale-invariant, so its gradient is unchanged): with its largest entry in [1, 2)
    the squares neither underflow nor overflow (float32 rows ~1e-23 came out with norm 5.9e14,
    rows ~1e20 with norm 0).
    """

    def constrain(self, weight: Tensor) -> Tensor:
        weight = weight / power_of_two_scale(weight, dim=(1,))[:, None]
        norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)  # (out, 1)
        return weight / norms.clamp_min(torch.finfo(weight.dtype).tiny)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        return float(gram_spectral_bound(weight))


class RowNormLinear(ConstrainedLinear):
    """``nn.Linear`` whose rows have unit l2 norm: the certifying last layer (Araujo et al. 2023).

    Not 1-Lipschitz as a whole (its norm can reach sqrt(out_features)); certify with
    :meth:`pairwise_row_distance_bound` and the body's bound.
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
            in_features, out_features, bias, device, dtype, constraint=RowNormalization()
        )

    def pairwise_row_distance_bound(self) -> Tensor:
        """Sound float64 (out, out) upper bounds of ||w_i - w_j||_2 for the current weights."""
        return pairwise_row_distance_bound(self.constrained_weight())
