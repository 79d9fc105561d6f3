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
theta = 0.9 for eps = 0.3. The margin is the raw logit margin, the certificate of the negated
head only: behind a linear head m certifies m / (L ||w_y - w_j||_1), which scaling the head leaves
unchanged while it drives this hinge to 0.

Targets are (B,) int64 class ids; logits are (B, C) with C >= 2.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F

from lipcert.losses.base import ReducedLoss, check_hyperparameter, multiclass_inputs, reduce


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """m = f_y - max_{j != y} f_j per sample: (B,)."""
    true = logits.gather(1, targets[:, None])[:, 0]  # (B,)
    others = logits.scatter(1, targets[:, None], float("-inf"))  # (B, C)
    return true - others.amax(dim=1)


def clipped_hinge(logits: Tensor, targets: Tensor, threshold: float) -> Tensor:
    """min((theta - m)_+, theta) per sample: (B,) (Zhang et al. 2022)."""
    return (threshold - margins(logits, targets)).clamp(min=0.0, max=threshold)


def linf_dist_loss(
    logits: Tensor,
    targets: Tensor,
    hinge_threshold: float,
    ce_scale: float,
    ce_weight: float,
    reduction: str = "mean",
) -> Tensor:
    """``ce_weight`` * CE(``ce_scale`` * f, y) + clipped hinge at ``hinge_threshold``."""
    hinge_threshold = check_hyperparameter("hinge_threshold", hinge_threshold, positive=True)
    ce_scale = check_hyperparameter("ce_scale", ce_scale, positive=True)
    ce_weight = check_hyperparameter("ce_weight", ce_weight, positive=False)
    logits, targets = multiclass_inputs("linf_dist_loss", logits, targets)
    terms = clipped_hinge(logits, targets, hinge_threshold)
    if ce_weight > 0:
        ce = F.cross_entropy(ce_scale * logits, targets, reduction="none")
        terms = terms + ce_weight * ce
    return reduce(terms, reduction)


class LinfDistLoss(ReducedLoss):
    """Module form of :func:`linf_dist_loss` with the decaying mix (``set_progress``).

    ``ce_weight`` is lambda at the start, ``mix`` its current value: ``ce_weight`` until progress
    ``decay_start``, then a linear decay to 0 (``ce_weight_end`` = 0) or a geometric one to
    ``ce_weight_end`` at ``decay_end``, constant after.
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

    def set_progress(self, progress: float) -> None:
        t = min(max((progress - self.decay_start) / (self.decay_end - self.decay_start), 0.0), 1.0)
        if self.ce_weight_end > 0:
            self.mix = self.ce_weight * math.exp(t * math.log(self.ce_weight_end / self.ce_weight))
        else:
            self.mix = self.ce_weight * (1.0 - t)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return linf_dist_loss(
            logits, targets, self.hinge_threshold, self.ce_scale, self.mix, self.reduction
        )
