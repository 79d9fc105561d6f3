"""Losses for Lipschitz classifiers: a pure function does the math, a thin module stores the
hyper-parameters and the reduction ("mean" | "sum" | "none", torch's meaning).

Sign and weighting conventions. Every loss is minimized. f: logits; B: batch size; C: classes;
m: margin; P+ / P-: samples with label > 0 / the others; y = +1 on P+, -1 on P-. ``alpha`` (>= 0)
weights the hinge only, the KR term keeps weight 1. "none" gives (B,) per-sample terms whose mean
is the "mean" value; for the KR terms a sample of P+ contributes -(B / n+) f, one of P- +(B / n-) f,
and a class absent from the batch contributes 0.

================================  ======================================================  =======
module (function)                 value with reduction="mean"                             targets
================================  ======================================================  =======
KRLoss (kr_loss)                  -(E_{P+}[f] - E_{P-}[f]); = -W1(P+, P-) at the best      binary
                                  1-Lipschitz f
HKRLoss(alpha, margin)            -(E_{P+}[f] - E_{P-}[f]) + alpha E[(m - y f)_+]          binary
(hkr_loss)
MulticlassHingeLoss(margin)       E[((C - 1) (m - f_y)_+ + sum_{j != y} (m + f_j)_+) / C]  ids
(multiclass_hinge_loss)
MulticlassHKRLoss(alpha, margin)  (1/C) sum_k -(E_{y=k}[f_k] - E_{y!=k}[f_k])              ids
(multiclass_hkr_loss)             + alpha * the multi-class hinge above
(multiclass_kr_loss: alpha = 0)
TauCrossEntropyLoss(tau)          CE(tau f, y) / tau                                      ids
(tau_cross_entropy)
LMTLoss(eps, lipschitz)           CE(f + sqrt(2) eps L (1 - onehot(y)), y)                ids
(lmt_loss)
LinfDistLoss(theta, s, lambda)    lambda CE(s f, y) + min((theta - m)_+, theta), m the     ids
(linf_dist_loss)                  margin (bound behind a linear head: m', twice the
                                  certified radius); lambda decays with set_progress
================================  ======================================================  =======

binary: logits (B,) or (B, 1); targets (B,) or (B, 1), all in {0, 1} or all in {-1, +1}.
ids: logits (B, C), C >= 2; targets (B,) int64 class ids.
Logits must be finite; float16 / bfloat16 logits are computed in float32 (a float32 loss, as under
torch.autocast), since tau f or LMT's raised logits overflow float16 for finite inputs.

Mapping to deel-torchlip 1.0.5 (``deel.torchlip``, "DL"). DL weights the hinge by a_DL in [0, 1]
and the KR term by 1 - a_DL, its ``min_margin`` is the full gap between classes (its hinge uses
min_margin / 2), its KR losses take (B, 1) or one-hot (B, C) targets. These hold for every
reduction, per sample:

================================  ==============================================================
lipcert                           deel-torchlip
================================  ==============================================================
KRLoss()                          NegKRLoss() = -KRLoss() (DL's KRLoss is the estimate, maximized)
HKRLoss(alpha, m)                 (1 + alpha) * HKRLoss(alpha / (1 + alpha), min_margin=2 m)
MulticlassHingeLoss(m)            HingeMulticlassLoss(min_margin=2 m), one-hot targets
MulticlassHKRLoss(alpha, m)       (1 + alpha) * HKRMulticlassLoss(alpha / (1 + alpha), 2 m)
TauCrossEntropyLoss(tau)          TauCrossEntropyLoss(tau)
LMTLoss(eps, lipschitz)           none
LinfDistLoss(...)                 none
================================  ==============================================================
"""

from lipcert.losses.cross_entropy import (
    LMT_MARGIN_FACTOR,
    LMTLoss,
    TauCrossEntropyLoss,
    lmt_loss,
    tau_cross_entropy,
)
from lipcert.losses.kr import HKRLoss, KRLoss, hkr_loss, kr_loss
from lipcert.losses.linf import (
    LinfDistLoss,
    certified_margins,
    clipped_hinge,
    linf_dist_loss,
)
from lipcert.losses.multiclass import (
    MulticlassHingeLoss,
    MulticlassHKRLoss,
    multiclass_hinge_loss,
    multiclass_hkr_loss,
    multiclass_kr_loss,
)

__all__ = [
    "LMT_MARGIN_FACTOR",
    "HKRLoss",
    "KRLoss",
    "LMTLoss",
    "LinfDistLoss",
    "MulticlassHKRLoss",
    "MulticlassHingeLoss",
    "TauCrossEntropyLoss",
    "certified_margins",
    "clipped_hinge",
    "hkr_loss",
    "kr_loss",
    "linf_dist_loss",
    "lmt_loss",
    "multiclass_hinge_loss",
    "multiclass_hkr_loss",
    "multiclass_kr_loss",
    "tau_cross_entropy",
]
