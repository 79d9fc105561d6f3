"""Multi-class hKR: one-vs-all KR terms plus the one-vs-all multi-class hinge.

Each logit f_k is trained as a binary one-vs-all problem, class k against the rest (the
multi-class extension of Serrurier et al., CVPR 2021, Eq. 5-6); per sample the C one-vs-all
terms are averaged. Targets are (B,) int64 class ids.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lipcert.losses.base import ReducedLoss, check_hyperparameter, multiclass_inputs, reduce
from lipcert.losses.kr import hinge_terms, kr_terms


def _multiclass_kr(logits: Tensor, onehot: Tensor) -> Tensor:
    """(B,) per-sample one-vs-all KR terms, averaged over the C classes."""
    return kr_terms(logits, onehot).mean(dim=1)


def _multiclass_hinge(logits: Tensor, onehot: Tensor, margin: float) -> Tensor:
    """(B,) per-sample ((C - 1) (m - f_y)_+ + sum_{j != y} (m + f_j)_+) / C.

    The true class is weighted C - 1 so that, per sample, it weighs as much as the C - 1 others.
    """
    n_classes = logits.shape[1]
    weights = torch.where(onehot, n_classes - 1.0, 1.0).to(logits.dtype)  # (B, C)
    return (weights * hinge_terms(logits, onehot, margin)).mean(dim=1)


def _onehot(logits: Tensor, targets: Tensor) -> Tensor:
    return F.one_hot(targets, logits.shape[1]).bool()  # (B, C)


def multiclass_kr_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """(1/C) sum_k -(E_{y=k}[f_k] - E_{y!=k}[f_k]): one-vs-all KR terms, averaged over classes.

    Serrurier et al., CVPR 2021, the KR term of Eq. 5 applied to each class against the rest.
    """
    logits, targets = multiclass_inputs("multiclass_kr_loss", logits, targets)
    return reduce(_multiclass_kr(logits, _onehot(logits, targets)), reduction)


def multiclass_hinge_loss(
    logits: Tensor, targets: Tensor, margin: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """One-vs-all hinge: E[((C - 1) (m - f_y)_+ + sum_{j != y} (m + f_j)_+) / C].

    The hinge of Serrurier et al., CVPR 2021, Eq. 5-6 for each class against the rest, with the
    true class reweighted by C - 1.
    """
    margin = check_hyperparameter("margin", margin, positive=True)
    logits, targets = multiclass_inputs("multiclass_hinge_loss", logits, targets)
    return reduce(_multiclass_hinge(logits, _onehot(logits, targets), margin), reduction)


def multiclass_hkr_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float,
    margin: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class hKR: :func:`multiclass_kr_loss` + ``alpha`` * :func:`multiclass_hinge_loss`.

    Serrurier et al., CVPR 2021, Eq. 5-6, one-vs-all.
    """
    alpha = check_hyperparameter("alpha", alpha, positive=False)
    margin = check_hyperparameter("margin", margin, positive=True)
    logits, targets = multiclass_inputs("multiclass_hkr_loss", logits, targets)
    onehot = _onehot(logits, targets)
    terms = _multiclass_kr(logits, onehot) + alpha * _multiclass_hinge(logits, onehot, margin)
    return reduce(terms, reduction)


class MulticlassHingeLoss(ReducedLoss):
    """Module form of :func:`multiclass_hinge_loss`."""

    hyperparameters = ("margin",)

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.margin = check_hyperparameter("margin", margin, positive=True)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return multiclass_hinge_loss(logits, targets, self.margin, reduction=self.reduction)


class MulticlassHKRLoss(ReducedLoss):
    """Module form of :func:`multiclass_hkr_loss` (``alpha=0``: one-vs-all KR alone)."""

    hyperparameters = ("alpha", "margin")

    def __init__(self, alpha: float, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.alpha = check_hyperparameter("alpha", alpha, positive=False)
        self.margin = check_hyperparameter("margin", margin, positive=True)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return multiclass_hkr_loss(
            logits, targets, self.alpha, self.margin, reduction=self.reduction
        )
