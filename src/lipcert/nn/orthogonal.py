"""Orthogonal Linear layer: Björck orthonormalization started from a soundly normalized weight.

Björck & Bowie, "An iterative algorithm for computing the best estimate of an orthogonal matrix",
SIAM J. Numer. Anal. 1971 (first-order step, their Eq. 13), as used by Anil et al., "Sorting out
Lipschitz function approximation", ICML 2019 (Sec. 4.2, Eq. 11):

    W_{k+1} = W_k (3/2 I - 1/2 W_k^T W_k).

The step acts on each singular value alone as f(s) = 3/2 s - 1/2 s^3, which maps [0, 1] into
[0, 1] (f is increasing there and f(1) = 1) and has the fixed point 1 with f'(1) = 0. Starting
from W_0 = W / B(W), with B the Gram-iteration *upper* bound of sigma_1(W) (Delattre et al., ICML
2023), every singular value starts in [0, 1], so every iterate has norm <= 1 in exact arithmetic
and approaches an orthogonal matrix (orthonormal columns when out >= in, rows when out < in).
Float rounding can lift the norm by a few ulps; ``lipschitz_bound()`` measures it from the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipcert.bounds.operator import gram_spectral_bound, semi_unitary_spectral_bound
from lipcert.nn.constrained import BoundedWeightConstraint, ConstrainedLinear


def bjorck_step(weight: Tensor) -> Tensor:
    """One first-order Björck step via the smaller Gram matrix (Björck & Bowie 1971, Eq. 13)."""
    if weight.shape[-2] >= weight.shape[-1]:
        return 1.5 * weight - 0.5 * weight @ (weight.mT @ weight)  # W^T W: (in, in)
    return 1.5 * weight - 0.5 * (weight @ weight.mT) @ weight  # W W^T: (out, out)


@dataclass(frozen=True)
class BjorckOrthogonalizer:
    """``iterations`` Björck steps from W / B(W), B >= sigma_1(W) (a strategy object).

    Its tolerance is ||W_k^T W_k - I||_2 (smaller Gram matrix), which depends on the start: see
    :data:`BJORCK_PRESETS`.
    """

    iterations: int
    #: Stop early once a step moves no entry by more than this (0: always ``iterations`` steps).
    #: Every step keeps the norm <= 1, so stopping early never breaks the bound.
    tolerance: float = 0.0

    def __call__(self, weight: Tensor) -> Tensor:
        weight = weight / gram_spectral_bound(weight)
        for _ in range(self.iterations):
            step = bjorck_step(weight)
            converged = self.tolerance > 0 and bool(
                (step - weight).detach().abs().amax() <= self.tolerance
            )
            weight = step
            if converged:
                break
        return weight


#: Named presets. Tolerance ||W^T W - I||_2 after the steps, worst of 5 float64 seeds, for square
#: 64 x 64 and 256 x 256 weights (tall/wide ones converge faster: their sigma_min is larger),
#: checked by tests/test_orthogonal.py::test_presets_reach_their_documented_tolerance:
#:
#: ========= ===== ================================= ===============================
#: preset    steps orthogonal + 30% noise (training) torch default init (worst case)
#: ========= ===== ================================= ===============================
#: "fast"      6   <= 2e-8                           not orthogonal (up to 1.0)
#: "default"  15   <= 1e-14 (machine precision)      not orthogonal (up to 1.0)
#: "precise"  50   <= 1e-14                          <= 1e-14
#: "adaptive" <=15 <= 1e-14                          not orthogonal (up to 1.0)
#: ========= ===== ================================= ===============================
#:
#: "adaptive" stops once a step moves no entry by more than 1e-6: near orthogonality Björck
#: converges quadratically, so the next step would change entries by ~1e-12. A weight one small
#: step from orthogonal takes 2-4 steps: 3.1x faster than "default" (forward + backward,
#: 784 -> 256, float32, one thread), with the same float64 tolerance in the table. In training the
#: raw weight drifts away from orthogonality, so the saving shrinks or vanishes: an MNIST
#: GroupSort MLP epoch took 33.1 s instead of 42.6 s in benchmarks/peer_comparison.py, and 36.0 s
#: instead of 35.5 s with configs/mnist_hkr.toml (docs/results.md).
#:
#: A square default-init weight has sigma_min / sigma_max ~ 1e-5..6e-3 (measured), which 1.5x a step
#: lifts slowly. OrthoLinear starts orthogonal, so "default" stays at machine precision while
#: training moves the raw weight; every preset has norm <= 1 whatever the start.
BJORCK_PRESETS = {
    "fast": BjorckOrthogonalizer(6),
    "default": BjorckOrthogonalizer(15),
    "precise": BjorckOrthogonalizer(50),
    "adaptive": BjorckOrthogonalizer(15, tolerance=1e-6),
}


def bjorck_orthogonalizer(bjorck_iters: int | str) -> BjorckOrthogonalizer:
    """The orthogonalizer for a preset name or an explicit number of steps."""
    if isinstance(bjorck_iters, str):
        if bjorck_iters not in BJORCK_PRESETS:
            raise ValueError(
                f"bjorck_iters={bjorck_iters!r} is not a preset; use one of "
                f"{sorted(BJORCK_PRESETS)} or a number of steps"
            )
        return BJORCK_PRESETS[bjorck_iters]
    if isinstance(bjorck_iters, bool) or not isinstance(bjorck_iters, int) or bjorck_iters < 0:
        raise ValueError(f"bjorck_iters must be a preset name or an int >= 0, got {bjorck_iters!r}")
    return BjorckOrthogonalizer(bjorck_iters)


class BjorckOrthogonalization(BoundedWeightConstraint):
    """The parametrization W -> orthogonalizer(W)."""

    def __init__(self, orthogonalizer: BjorckOrthogonalizer) -> None:
        super().__init__()
        self.orthogonalizer = orthogonalizer

    def constrain(self, weight: Tensor) -> Tensor:
        return self.orthogonalizer(weight)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        """The tighter of two sound bounds: Gram iteration on W (any W), and sqrt(1 + ||W^T W - I||)
        (tight near orthogonality, where Gram iteration overestimates a flat spectrum)."""
        return min(float(gram_spectral_bound(weight)), semi_unitary_spectral_bound(weight))


class OrthoLinear(ConstrainedLinear):
    """``nn.Linear`` with a (nearly) orthogonal weight of norm <= 1: 1-Lipschitz, and gradient-norm
    preserving once orthogonal (Anil et al., ICML 2019, Sec. 4.2).

    ``bjorck_iters``: a preset of :data:`BJORCK_PRESETS` or a number of Björck steps. The weight
    is initialised orthogonal (``nn.init.orthogonal_``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        bjorck_iters: int | str = "default",
    ) -> None:
        constraint = BjorckOrthogonalization(bjorck_orthogonalizer(bjorck_iters))
        super().__init__(in_features, out_features, bias, device, dtype, constraint=constraint)

    def init_weight(self, weight: Tensor) -> None:
        nn.init.orthogonal_(weight)
