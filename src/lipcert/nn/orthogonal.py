"""Orthogonal Linear layer: Björck orthonormalization started from a soundly normalized weight,
or a single guarded Björck step on a raw weight kept orthogonal by retraction.

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

Retraction (``OrthoLinear(..., retraction=k)``): the same polynomial f bounds |f(s)| <= 1 for every
s in [0, 2] (f(2) = -1), so a *single* Björck step is a sound 1-Lipschitz constraint on any raw
weight whose singular values are at most 2 (a guard rescales the others). Its Jacobian at an
orthogonal W is the projection onto the tangent space, dW - W sym(W^T dW), so gradients are the
Riemannian ones of Björck's parametrization. After each optimizer step :func:`retract_` pulls the
raw weight back to orthogonal with k Björck steps without gradients (a retraction onto the Stiefel
manifold), so the next forward starts one step from orthogonal: 3 matrix products a step instead
of 45 for 15 Björck steps with their backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lipcert.bounds.operator import gram_spectral_bound, semi_unitary_spectral_bound
from lipcert.nn.constrained import BoundedWeightConstraint, ConstrainedLinear
from lipcert.nn.constraint import original
from lipcert.precision import ieee_float32


def _gram(weight: Tensor) -> Tensor:
    """The smaller Gram matrix, W^T W or W W^T."""
    return weight.mT @ weight if weight.shape[-2] >= weight.shape[-1] else weight @ weight.mT


def _bjorck_step_from_gram(weight: Tensor, gram: Tensor) -> Tensor:
    """:func:`bjorck_step` given the smaller Gram matrix of ``weight``."""
    if weight.shape[-2] >= weight.shape[-1]:
        return 1.5 * weight - 0.5 * weight @ gram
    return 1.5 * weight - 0.5 * gram @ weight


def bjorck_step(weight: Tensor) -> Tensor:
    """One first-order Björck step via the smaller Gram matrix (Björck & Bowie 1971, Eq. 13)."""
    return _bjorck_step_from_gram(weight, _gram(weight))


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
#: instead of 35.5 s with the 256-wide hKR config of the time (docs/results.md). For a raw weight
#: kept orthogonal, use ``OrthoLinear(..., retraction=k)`` instead (5.1 s an epoch there).
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


class NearOrthogonalBound(BoundedWeightConstraint):
    """Base of the orthogonal constraints: the sound bound of a (nearly) orthogonal weight."""

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        """sqrt(lambda_max(W^T W)) from the defect W^T W - I, exact up to rounding near
        orthogonality and far from it (:func:`~lipcert.bounds.operator.
        semi_unitary_spectral_bound`)."""
        return semi_unitary_spectral_bound(weight)


class BjorckOrthogonalization(NearOrthogonalBound):
    """The parametrization W -> orthogonalizer(W)."""

    def __init__(self, orthogonalizer: BjorckOrthogonalizer) -> None:
        super().__init__()
        self.orthogonalizer = orthogonalizer

    def constrain(self, weight: Tensor) -> Tensor:
        return self.orthogonalizer(weight)


#: The forward's guard keeps every singular value at most this (< 2, where |f| <= 1 ends): the
#: 2.5% margin covers the float32 rounding of the Gram matrix (relative n u <= 6e-4 for n <= 1e4,
#: Higham eq. 3.5) many times over.
FORWARD_MAX_SINGULAR = 1.95
#: The retraction's guard: Björck converges to orthogonal from singular values in (0, sqrt(3)).
RETRACTION_MAX_SINGULAR = 1.7
#: The retraction adds steps while ||G - I||_F exceeds this before a step (every singular value
#: then lies in [0.7, 1.2], and the step takes the defect e to ~1.5 e^2), up to
#: MAX_RETRACTION_STEPS: from 1e-5, 1.5x a step needs ~28.
RETRACTION_TOLERANCE = 0.5
MAX_RETRACTION_STEPS = 32


def _guard_scale(gram: Tensor, max_singular: float) -> Tensor:
    """A detached factor c >= 1 with sigma_max(W / c) <= ``max_singular``.

    sigma_max(W)^2 = ||G||_2 <= ||G||_inf (the largest absolute row sum of the Gram matrix G).
    """
    row_sum_bound = gram.detach().abs().sum(dim=-1).amax().sqrt()
    return torch.clamp(row_sum_bound / max_singular, min=1.0)


def _estimated_scale(gram: Tensor, max_singular: float, iterations: int = 8) -> Tensor:
    """A factor c >= 1 with sigma_max(W / c) <= ``max_singular`` *estimated* by power iteration
    on the Gram matrix (1.2x safety). Not a bound: the retraction only needs it for convergence
    (the forward's guard is the sound one), and a row-sum bound, loose for a Gram matrix with many
    large off-diagonal entries, kept shrinking a collapsed 1024 x 1024 weight instead of
    restoring it (measured: 934 singular values stayed below 0.1)."""
    vector = torch.ones(gram.shape[-1], 1, dtype=gram.dtype, device=gram.device)
    for _ in range(iterations):
        vector = gram @ vector
        vector = vector / vector.norm().clamp_min(torch.finfo(gram.dtype).tiny)
    estimate = (vector.mT @ gram @ vector).squeeze().clamp_min(0).sqrt() * 1.2
    return torch.clamp(estimate / max_singular, min=1.0)


def guarded_bjorck_step(weight: Tensor) -> Tensor:
    """f(W / c) = 3/2 W / c - 1/2 W G / c^3 (Björck & Bowie 1971, Eq. 13) with the guard c.

    Every singular value of W / c lies in [0, 1.95], where |f| <= 1: norm <= 1 for any ``weight``.
    One Gram matrix serves both the guard and the step.
    """
    gram = _gram(weight)
    c = _guard_scale(gram, FORWARD_MAX_SINGULAR)
    return _bjorck_step_from_gram(weight / c, gram / c**2)


class RetractedOrthogonalization(NearOrthogonalBound):
    """W -> one guarded Björck step; :meth:`retract_` restores the raw weight's orthogonality."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def constrain(self, weight: Tensor) -> Tensor:
        return guarded_bjorck_step(weight)

    @torch.no_grad()
    def retract_(self, weight: Tensor) -> None:
        """At least ``steps`` Björck steps on the raw ``weight``, in place, without gradients;
        more (up to :data:`MAX_RETRACTION_STEPS`) while ||G - I||_F > :data:`RETRACTION_TOLERANCE`,
        which brings back singular values that a large optimizer step pushed towards 0."""
        with ieee_float32():
            result = weight
            eye = torch.eye(min(weight.shape[-2:]), dtype=weight.dtype, device=weight.device)
            for step in range(MAX_RETRACTION_STEPS):
                gram = _gram(result)
                c = _estimated_scale(gram, RETRACTION_MAX_SINGULAR)
                gram = gram / c**2
                result = _bjorck_step_from_gram(result / c, gram)
                if step + 1 < self.steps:  # the defect check (a GPU sync) only where it may stop
                    continue
                if torch.linalg.matrix_norm(gram - eye) <= RETRACTION_TOLERANCE:
                    break
            weight.copy_(result)


class OrthoLinear(ConstrainedLinear):
    """``nn.Linear`` with a (nearly) orthogonal weight of norm <= 1: 1-Lipschitz, and gradient-norm
    preserving once orthogonal (Anil et al., ICML 2019, Sec. 4.2).

    ``bjorck_iters``: a preset of :data:`BJORCK_PRESETS` or a number of Björck steps. The weight
    is initialised orthogonal (``nn.init.orthogonal_``).

    ``retraction=k`` (k >= 1) replaces the Björck parametrization by one guarded Björck step in
    the forward (:func:`guarded_bjorck_step`, norm <= 1 whatever the raw weight) and k Björck
    steps on the raw weight after each optimizer step, which :func:`retract_` performs: lipcert's
    training loop calls it; in your own loop call ``retract_(model)`` after ``optimizer.step()``
    or attach it once with :func:`retract_after_steps`. Without it the layer stays 1-Lipschitz but
    drifts from orthogonal. ``bjorck_iters`` is then unused.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        bjorck_iters: int | str = "default",
        retraction: int = 0,
    ) -> None:
        if isinstance(retraction, bool) or not isinstance(retraction, int) or retraction < 0:
            raise ValueError(f"retraction must be an int >= 0 (Björck steps), got {retraction!r}")
        constraint = (
            RetractedOrthogonalization(retraction)
            if retraction
            else BjorckOrthogonalization(bjorck_orthogonalizer(bjorck_iters))
        )
        super().__init__(in_features, out_features, bias, device, dtype, constraint=constraint)

    def init_weight(self, weight: Tensor) -> None:
        nn.init.orthogonal_(weight)


def retract_(model: nn.Module) -> int:
    """Retract the raw weight of every ``OrthoLinear(..., retraction=k)`` in ``model`` to
    orthogonal (in place); returns how many layers it retracted. Call after each optimizer step."""
    layers = [
        module
        for module in model.modules()
        if isinstance(module, OrthoLinear)
        and isinstance(module.constraint, RetractedOrthogonalization)
    ]
    for layer in layers:
        layer.constraint.retract_(original(layer))
    return len(layers)


def retract_after_steps(optimizer: Optimizer, model: nn.Module) -> RemovableHandle:
    """Run :func:`retract_` on ``model`` after every ``optimizer.step()`` (a step post-hook)."""
    return optimizer.register_step_post_hook(lambda *_: retract_(model))
