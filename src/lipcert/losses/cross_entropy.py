"""Cross-entropy losses for Lipschitz networks: temperature-scaled (offset) CE and
Lipschitz-margin CE.

Targets are (B,) int64 class ids; logits are (B, C) with C >= 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from lipcert.losses.base import ReducedLoss, check_hyperparameter, multiclass_inputs, reduce

#: ||e_y - e_j||_2 for two one-hot vectors: if f is L-Lipschitz (l2), f_y - f_j is sqrt(2) L
#: Lipschitz, so a logit margin above sqrt(2) L eps certifies radius eps (Tsuzuku et al.,
#: NeurIPS 2018, Prop. 1).
LMT_MARGIN_FACTOR = math.sqrt(2.0)


def tau_cross_entropy(
    logits: Tensor, targets: Tensor, tau: float, reduction: str = "mean", *, offset: float = 0.0
) -> Tensor:
    """CE(tau (f - offset onehot(y)), y) / tau: CE with temperature tau (Béthune et al.,
    NeurIPS 2022, Sec. 4) on logits whose target is lowered by ``offset`` (the offset
    cross-entropy that Prach & Lampert, ECCV 2022, train AOL networks with).

    Dividing by tau keeps the gradient in f bounded by sqrt(2) for every tau; as tau grows the
    loss tends to the margin hinge relu(offset + max_{j != y} f_j - f_y); as tau -> 0 it is
    log(C) / tau + mean_j f_j - f_y + (1 - 1/C) offset + O(tau), a KR-like linear loss (the offset
    only adds a constant there). The offset is LMT's margin (Tsuzuku et al., NeurIPS 2018):
    ``offset = sqrt(2) eps`` asks a 1-Lipschitz net for the margin that certifies radius eps (a
    unit-row head needs ||w_y - w_j|| eps: sqrt(2) eps for orthogonal rows, at most 2 eps).
    """
    tau = check_hyperparameter("tau", tau, positive=True)
    offset = check_hyperparameter("offset", offset, positive=False)
    logits, targets = multiclass_inputs("tau_cross_entropy", logits, targets)
    if offset:
        logits = logits - offset * F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return reduce(F.cross_entropy(tau * logits, targets, reduction="none") / tau, reduction)


def _check_lipschitz(lipschitz: float | Tensor, device: torch.device) -> float | Tensor:
    """A finite Lipschitz constant >= 0: a float, or a floating one-element (maybe grad) tensor."""
    if not isinstance(lipschitz, Tensor):
        return check_hyperparameter("lipschitz", lipschitz, positive=False)
    if lipschitz.numel() != 1 or not lipschitz.is_floating_point():
        raise ValueError(
            "lipschitz must be a float or a one-element floating tensor, got shape "
            f"{tuple(lipschitz.shape)} and dtype {lipschitz.dtype}"
        )
    if not bool(lipschitz.isfinite().all()) or bool((lipschitz < 0).any()):
        raise ValueError(f"lipschitz must be finite and >= 0, got {lipschitz.item()}")
    return lipschitz.reshape(()).to(device)  # () so it broadcasts; differentiable


def lmt_loss(
    logits: Tensor,
    targets: Tensor,
    eps: float,
    lipschitz: float | Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Lipschitz-margin CE: CE(f + sqrt(2) eps L (1 - onehot(y)), y).

    Tsuzuku et al., NeurIPS 2018, Sec. 4 (LMT): every non-target logit is raised by the margin
    that certifies radius ``eps`` (Prop. 1), so the loss only vanishes on samples certified at
    ``eps``. ``lipschitz`` (L) is a float or a differentiable scalar tensor (the network's current
    bound, so the loss also pushes L down).
    """
    eps = check_hyperparameter("eps", eps, positive=False)
    logits, targets = multiclass_inputs("lmt_loss", logits, targets)
    lipschitz = _check_lipschitz(lipschitz, logits.device)
    off_target = 1.0 - F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # (B, C)
    shifted = logits + LMT_MARGIN_FACTOR * eps * lipschitz * off_target
    return reduce(F.cross_entropy(shifted, targets, reduction="none"), reduction)


class TauCrossEntropyLoss(ReducedLoss):
    """Module form of :func:`tau_cross_entropy`: CE(tau (f - offset onehot(y)), y) / tau."""

    hyperparameters = ("tau", "offset")

    def __init__(self, tau: float, reduction: str = "mean", *, offset: float = 0.0) -> None:
        super().__init__(reduction)
        self.tau = check_hyperparameter("tau", tau, positive=True)
        self.offset = check_hyperparameter("offset", offset, positive=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return tau_cross_entropy(logits, targets, self.tau, self.reduction, offset=self.offset)


class LMTLoss(ReducedLoss):
    """Module form of :func:`lmt_loss`.

    The Lipschitz constant is either fixed here (a float) or passed to each call (a float or a
    differentiable tensor), not both. A tensor is not accepted here: its autograd graph would be
    reused across steps.
    """

    hyperparameters = ("eps", "lipschitz")

    def __init__(self, eps: float, lipschitz: float | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.eps = check_hyperparameter("eps", eps, positive=False)
        if lipschitz is not None:
            lipschitz = check_hyperparameter("lipschitz", lipschitz, positive=False)
        self.lipschitz = lipschitz

    def forward(
        self, logits: Tensor, targets: Tensor, lipschitz: float | Tensor | None = None
    ) -> Tensor:
        if lipschitz is None and self.lipschitz is None:
            raise ValueError("LMTLoss: no lipschitz given, neither at construction nor per call")
        if lipschitz is not None and self.lipschitz is not None:
            raise ValueError(
                f"LMTLoss: lipschitz was fixed at construction ({self.lipschitz}); "
                "do not pass it per call too"
            )
        constant = self.lipschitz if lipschitz is None else lipschitz
        return lmt_loss(logits, targets, self.eps, constant, reduction=self.reduction)
