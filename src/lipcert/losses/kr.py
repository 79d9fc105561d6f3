"""Binary Kantorovich-Rubinstein (KR) and hinge-regularized KR (hKR) losses.

Labels are all in {0, 1} or all in {-1, +1}; a sample is positive (P+) iff its label is > 0. The
KR term is minimized, so it carries a minus sign: -(E_{P+}[f] - E_{P-}[f]). The batch estimate
is written as per-sample terms (for ``reduction="none"``) whose mean is the estimate:
t_i = -(B / n+) f_i for a positive sample, +(B / n-) f_i for a negative one. A class absent from
the batch contributes an expectation of 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipcert.losses.base import ReducedLoss, binary_inputs, check_hyperparameter, reduce


def kr_terms(logits: Tensor, positive: Tensor) -> Tensor:
    """Per-sample terms of -(E_{P+}[f_k] - E_{P-}[f_k]), one column k at a time.

    ``logits`` and ``positive`` (bool) are (B, K); the batch mean of column k is the negated KR
    estimate of the W1 distance between the samples positive in column k and the others
    (Arjovsky et al., ICML 2017, Eq. 3; Serrurier et al., CVPR 2021, the KR term of Eq. 5).
    """
    batch = logits.shape[0]
    pos = positive.to(logits.dtype)  # (B, K)
    n_pos = pos.sum(dim=0).clamp_min(1.0)  # (K,); an absent side has no terms to weight
    n_neg = (1.0 - pos).sum(dim=0).clamp_min(1.0)  # (K,)
    weights = batch * (pos / n_pos - (1.0 - pos) / n_neg)  # (B, K)
    return -weights * logits


def hinge_terms(logits: Tensor, positive: Tensor, margin: float) -> Tensor:
    """Elementwise hinge (margin - y f)_+ with y = +1 where ``positive``, else -1.

    Serrurier et al., CVPR 2021, the hinge term of Eq. 5-6 (margin m).
    """
    sign = positive.to(logits.dtype) * 2.0 - 1.0
    return torch.relu(margin - sign * logits)


def kr_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Negated KR estimate of W1(P+, P-): -(E_{P+}[f] - E_{P-}[f]) (Arjovsky et al., 2017, Eq. 3).

    At the optimum over 1-Lipschitz f it equals -W1(P+, P-). ``logits``: (B,) or (B, 1);
    ``targets``: (B,) or (B, 1) in {0, 1} or {-1, +1}.
    """
    logits, positive = binary_inputs("kr_loss", logits, targets)
    terms = kr_terms(logits[:, None], positive[:, None])[:, 0]  # (B,)
    return reduce(terms, reduction)


def hkr_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float,
    margin: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Binary hKR: -(E_{P+}[f] - E_{P-}[f]) + alpha * E[(margin - y f)_+].

    Serrurier et al., CVPR 2021, Eq. 5-6: the KR term of :func:`kr_loss` plus ``alpha`` (>= 0)
    times the hinge averaged over the whole batch; y = +1 for positive labels, -1 otherwise.
    """
    alpha = check_hyperparameter("alpha", alpha, positive=False)
    margin = check_hyperparameter("margin", margin, positive=True)
    logits, positive = binary_inputs("hkr_loss", logits, targets)
    kr = kr_terms(logits[:, None], positive[:, None])[:, 0]  # (B,)
    return reduce(kr + alpha * hinge_terms(logits, positive, margin), reduction)


class KRLoss(ReducedLoss):
    """Module form of :func:`kr_loss`: -(E_{P+}[f] - E_{P-}[f]), labels {0, 1} or {-1, +1}."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return kr_loss(logits, targets, reduction=self.reduction)


class HKRLoss(ReducedLoss):
    """Module form of :func:`hkr_loss`: KR term + ``alpha`` * hinge with ``margin``."""

    hyperparameters = ("alpha", "margin")

    def __init__(self, alpha: float, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.alpha = check_hyperparameter("alpha", alpha, positive=False)
        self.margin = check_hyperparameter("margin", margin, positive=True)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return hkr_loss(logits, targets, self.alpha, self.margin, reduction=self.reduction)
