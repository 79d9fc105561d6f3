"""The training objective of l_inf-distance nets: scaled cross-entropy + clipped hinge.

Zhang et al., "Boosting the Certified Robustness of L-infinity Distance Nets", ICLR 2022 (their
objective):
with margin m(x) = f_y(x) - max_{j != y} f_j(x) and hinge threshold theta,

    loss = lambda * CE(s * f, y) + min((theta - m)_+, theta),

the hinge is *clipped* at theta so that points far inside a wrong class (m <= 0), which cannot
become certified, stop pulling the weights, and the cross-entropy on the logits scaled by s
supplies the gradient signal early in training, when the l_p relaxation makes the net poorly
conditioned. The mixing coefficient lambda starts at ``ce_weight``, holds until training progress
``decay_start`` (``set_progress``, called by lipcert.train every step) and decays until
``decay_end``: linearly to 0 (``ce_weight_end`` = 0, training ends on the clipped hinge alone), or
geometrically to ``ce_weight_end`` > 0, lambda_0 (lambda_end / lambda_0)^t over the decay
(the authors' released MNIST recipe: lambda 0.05 -> 0.0002 over the l_p ramp, on a hinge divided
by theta, i.e. ``ce_weight`` = 0.05 theta here). Their s is a learned scalar (initialized to 1,
with its own learning rate); ``ce_scale`` fixes it. An l_inf-distance net with logits -u is
1-Lipschitz per logit in l_inf, so m(x) > 2 eps certifies radius eps: the authors take
theta = 2 eps_train with a train eps above the test eps (MNIST: 0.45 for 0.3, 0.3 for 0.1), so
theta = 0.9 for eps = 0.3.

**Behind a linear head** (an l_inf-distance body h, L_b-Lipschitz in l_inf, then logits W h + b:
``linf_dist_net(head="linear")``) the margin f_y - f_j moves by at most
L_b ||w_y - w_j||_1 ||delta||_inf (Hölder: the pair bound :func:`lipcert.certify` certifies with),
so the raw margin certifies nothing by itself: scaling the head scales m, and drove the raw hinge
to 0 without moving a radius. :meth:`LinfDistLoss.bind` (called by :func:`lipcert.train.train`)
finds such a head as certification does (:func:`lipcert.bounds.graph.graph_bound` in l_inf, eval
mode, every LinfDist at the p it ends training at, :func:`lipcert.nn.linf.final_p`), and the
hinge then reads

    m'(x) = 2 min_{j != y} (f_y(x) - f_j(x)) / (L_b ||w_y - w_j||_1),

twice the radius certify gives (before it subtracts its float-rounding allowance), from the
head's current weight at every step: the gradient also pulls ||w_y - w_j||_1 down. L_b is read
once, at bind: 1 for LinfDist layers at p = inf (the eval-mode mean shift is a constant), so the
body may hold no parameters outside LinfDist layers (a ValueError names the module: its bound
would go stale as it trains). Unbound, or bound to a model without a linear head (the negated
head: L_yj = 2, so m' = m), the loss reads m, to the bit. Either way the hinge reads the
certificate of the trained net (p = inf), not that of the l_p relaxation, as the authors' does;
the cross-entropy reads the raw logits.

Targets are (B,) int64 class ids; logits are (B, C) with C >= 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lipcert.losses.base import ReducedLoss, check_hyperparameter, multiclass_inputs, reduce
from lipcert.modes import eval_mode
from lipcert.nn.linf import LinfDist, final_p
from lipcert.precision import ieee_float32

#: Floor of the pair bounds L_b ||w_y - w_j||_1 before the division: coinciding head rows (their
#: margin is then a constant) give a large finite m' and finite gradients, not inf or NaN.
_MIN_PAIR_BOUND = 1e-12


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """m = f_y - max_{j != y} f_j per sample: (B,)."""
    true = logits.gather(1, targets[:, None])[:, 0]  # (B,)
    others = logits.scatter(1, targets[:, None], float("-inf"))  # (B, C)
    return true - others.amax(dim=1)


def certified_margins(logits: Tensor, targets: Tensor, pair_bounds: Tensor | None = None) -> Tensor:
    """m' = 2 min_{j != y} (f_y - f_j) / L_yj per sample: (B,), twice the radius that the (C, C)
    l_inf Lipschitz bounds ``pair_bounds`` L_yj of the margins f_y - f_j certify (differentiable
    in both), in float32 or wider. None: the raw margin m (the negated head's L_yj = 2 gives
    m' = m)."""
    if pair_bounds is None:
        return margins(logits, targets)
    classes = logits.shape[1]
    if not torch.is_tensor(pair_bounds) or pair_bounds.shape != (classes, classes):
        shape = tuple(pair_bounds.shape) if torch.is_tensor(pair_bounds) else type(pair_bounds)
        raise ValueError(
            f"pair_bounds must be a ({classes}, {classes}) tensor for logits of {classes} "
            f"classes, got {shape}: a loss bound to another model's head? (bind it to the model "
            "it trains)"
        )
    # at least float32: float16 rounds the floor 1e-12 to 0 (0 / 0 at the target gave NaN
    # gradients) and overflows at 65504
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    true = logits.gather(1, targets[:, None])  # (B, 1)
    bounds = pair_bounds.to(logits.dtype).index_select(0, targets).clamp_min(_MIN_PAIR_BOUND)
    ratios = (true - logits) / bounds  # (B, C), 0 at the target: excluded next
    return 2 * ratios.scatter(1, targets[:, None], math.inf).amin(dim=1)


def clipped_hinge(
    logits: Tensor, targets: Tensor, threshold: float, pair_bounds: Tensor | None = None
) -> Tensor:
    """min((theta - m)_+, theta) per sample: (B,) (Zhang et al. 2022); with ``pair_bounds`` on
    :func:`certified_margins`' m' instead of the raw m."""
    margin = certified_margins(logits, targets, pair_bounds)
    return (threshold - margin).clamp(min=0.0, max=threshold)


def linf_dist_loss(
    logits: Tensor,
    targets: Tensor,
    hinge_threshold: float,
    ce_scale: float,
    ce_weight: float,
    reduction: str = "mean",
    *,
    pair_bounds: Tensor | None = None,
) -> Tensor:
    """``ce_weight`` * CE(``ce_scale`` * f, y) + clipped hinge at ``hinge_threshold`` (on m', see
    :func:`certified_margins`, when ``pair_bounds`` are given)."""
    hinge_threshold = check_hyperparameter("hinge_threshold", hinge_threshold, positive=True)
    ce_scale = check_hyperparameter("ce_scale", ce_scale, positive=True)
    ce_weight = check_hyperparameter("ce_weight", ce_weight, positive=False)
    logits, targets = multiclass_inputs("linf_dist_loss", logits, targets)
    terms = clipped_hinge(logits, targets, hinge_threshold, pair_bounds)
    if ce_weight > 0:
        ce = F.cross_entropy(ce_scale * logits, targets, reduction="none")
        terms = terms + ce_weight * ce
    return reduce(terms, reduction)


def linear_head(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Linear, float] | None:
    """``model``'s linear head and its body's l_inf bound L_b, as :func:`lipcert.certify` finds
    them after training (eval mode, each LinfDist at its :func:`~lipcert.nn.linf.final_p`); None
    when the model ends in no linear layer. ValueError when a module of the body other than a
    LinfDist holds parameters: L_b is read once and would go stale as they train."""
    from lipcert.bounds.graph import graph_bound  # the bounds build on lipcert.nn, after the losses

    with eval_mode(model), final_p(model), torch.no_grad(), ieee_float32():
        bounds = graph_bound(model, tuple(input_shape), "linf")
    if bounds.head is None:
        return None
    for name, module in model.named_modules():
        owned = next(module.parameters(recurse=False), None) is not None
        if owned and module is not bounds.head and not isinstance(module, LinfDist):
            raise ValueError(
                f"LinfDistLoss.bind: {name} ({type(module).__name__}) has parameters in the body "
                "before the linear head; the hinge reads the body's bound once, so the body may "
                "hold only LinfDist layers and parameter-free modules"
            )
    return bounds.head, bounds.body_bound


def _head_pair_bounds(head: nn.Linear, body_bound: float) -> Callable[[], Tensor]:
    """L_b ||w_i - w_j||_1 (C, C) from the head's current weight, differentiable: l_1 is the dual
    of l_inf (certify's pair bound, there rounded up in float64)."""
    return lambda: body_bound * torch.cdist(head.weight, head.weight, p=1)


class LinfDistLoss(ReducedLoss):
    """Module form of :func:`linf_dist_loss` with the decaying mix (``set_progress``).

    ``ce_weight`` is lambda at the start, ``mix`` its current value: ``ce_weight`` until progress
    ``decay_start``, then a linear decay to 0 (``ce_weight_end`` = 0) or a geometric one to
    ``ce_weight_end`` at ``decay_end``, constant after.

    :meth:`bind` (``lipcert.train`` calls it) makes the hinge read m' behind a linear head
    (module docstring); unbound, or bound to a model without one, it reads the raw margin.
    """

    hyperparameters = (
        "hinge_threshold",
        "ce_scale",
        "ce_weight",
        "ce_weight_end",
        "decay_start",
        "decay_end",
    )

    def __init__(
        self,
        hinge_threshold: float,
        ce_scale: float = 1.0,
        ce_weight: float = 1.0,
        decay_end: float = 1.0,
        reduction: str = "mean",
        *,
        ce_weight_end: float = 0.0,
        decay_start: float = 0.0,
    ) -> None:
        super().__init__(reduction)
        self.hinge_threshold = check_hyperparameter(
            "hinge_threshold", hinge_threshold, positive=True
        )
        self.ce_scale = check_hyperparameter("ce_scale", ce_scale, positive=True)
        self.ce_weight = check_hyperparameter("ce_weight", ce_weight, positive=False)
        self.ce_weight_end = check_hyperparameter("ce_weight_end", ce_weight_end, positive=False)
        self.decay_start = check_hyperparameter("decay_start", decay_start, positive=False)
        self.decay_end = check_hyperparameter("decay_end", decay_end, positive=True)
        if self.ce_weight_end > 0 and self.ce_weight == 0:
            raise ValueError("ce_weight_end > 0 needs ce_weight > 0 (a geometric decay from it)")
        if not self.decay_start < self.decay_end:
            raise ValueError(f"decay_start ({decay_start}) must be < decay_end ({decay_end})")
        self.mix = self.ce_weight
        # L_b ||w_i - w_j||_1 from the head's current weight (a closure: the head is the model's).
        self._pair_bounds: Callable[[], Tensor] | None = None

    def bind(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        """Read the certificate's margin m' behind ``model``'s linear head from now on (inputs
        of shape ``input_shape``); a model without one keeps the raw margin."""
        found = linear_head(model, input_shape)
        self._pair_bounds = None if found is None else _head_pair_bounds(*found)

    def set_progress(self, progress: float) -> None:
        t = min(max((progress - self.decay_start) / (self.decay_end - self.decay_start), 0.0), 1.0)
        if self.ce_weight_end > 0:
            self.mix = self.ce_weight * math.exp(t * math.log(self.ce_weight_end / self.ce_weight))
        else:
            self.mix = self.ce_weight * (1.0 - t)

    def margins(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The margin the hinge reads, per sample (B,): m' when bound to a linear head, else m."""
        logits, targets = multiclass_inputs("LinfDistLoss", logits, targets)
        return certified_margins(logits, targets, self._current_pair_bounds())

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return linf_dist_loss(
            logits,
            targets,
            self.hinge_threshold,
            self.ce_scale,
            self.mix,
            self.reduction,
            pair_bounds=self._current_pair_bounds(),
        )

    def _current_pair_bounds(self) -> Tensor | None:
        return None if self._pair_bounds is None else self._pair_bounds()
