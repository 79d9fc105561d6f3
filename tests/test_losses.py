"""lipcert.losses: closed forms on tiny hand-computed inputs, gradients, reductions, validation,
and agreement with deel-torchlip after the documented convention mapping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

import lipcert.losses as losses
from lipcert.losses import (
    HKRLoss,
    KRLoss,
    LMTLoss,
    MulticlassHingeLoss,
    MulticlassHKRLoss,
    TauCrossEntropyLoss,
    hkr_loss,
    kr_loss,
    lmt_loss,
    multiclass_hinge_loss,
    multiclass_hkr_loss,
    multiclass_kr_loss,
    tau_cross_entropy,
)

#: Agreement tolerance in float64 (a few ulps of sums over <= 8 samples).
F64_TOL = 1e-12

# The binary example used throughout: f = (1, 2, 4), samples 0 and 2 positive.
# E+[f] = 2.5, E-[f] = 2, so KR = -(2.5 - 2) = -0.5; per-sample weights B/n+ = 1.5, B/n- = 3.
BINARY_LOGITS = [1.0, 2.0, 4.0]
BINARY_KR = -0.5
BINARY_KR_TERMS = [-1.5, 6.0, -6.0]


def test_public_names_import() -> None:
    for name in losses.__all__:
        assert getattr(losses, name) is not None


@pytest.mark.parametrize(
    "targets",
    [
        torch.tensor([1, 0, 1]),
        torch.tensor([1, -1, 1]),
        torch.tensor([1.0, -1.0, 1.0]),
        torch.tensor([True, False, True]),
        torch.tensor([[1], [0], [1]]),
    ],
)
@pytest.mark.parametrize("logit_shape", [(3,), (3, 1)])
def test_kr_closed_form(targets: torch.Tensor, logit_shape: tuple[int, ...]) -> None:
    f = torch.tensor(BINARY_LOGITS).reshape(logit_shape)
    assert kr_loss(f, targets).item() == pytest.approx(BINARY_KR)
    assert KRLoss(reduction="none")(f, targets).tolist() == pytest.approx(BINARY_KR_TERMS)
    assert KRLoss(reduction="sum")(f, targets).item() == pytest.approx(3 * BINARY_KR)


def test_kr_gradient() -> None:
    f = torch.tensor(BINARY_LOGITS, requires_grad=True)
    kr_loss(f, torch.tensor([1, 0, 1])).backward()
    # d/df_i of -(E+[f] - E-[f]) is -1/n+ on P+ and +1/n- on P-.
    assert f.grad.tolist() == pytest.approx([-0.5, 1.0, -0.5])


def test_kr_absent_class_contributes_zero() -> None:
    f = torch.tensor(BINARY_LOGITS)
    assert kr_loss(f, torch.ones(3)).item() == pytest.approx(-sum(BINARY_LOGITS) / 3)
    assert kr_loss(f, torch.zeros(3)).item() == pytest.approx(sum(BINARY_LOGITS) / 3)


def test_kr_equals_minus_w1_at_optimum_1d() -> None:
    # Sorted P+ = (0.5, 2.5, 3) lies right of sorted P- = (0, 1, 2) point by point, so the
    # monotone coupling moves all mass rightwards: W1 = mean(0.5, 1.5, 1) = 1, attained by f(x) = x.
    x = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 2.5], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert kr_loss(x, y).item() == pytest.approx(-1.0)


def test_kr_never_below_minus_w1() -> None:
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 2, generator=gen, dtype=torch.float64) + 1.0
    neg = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    w1 = ot.emd2(
        torch.full((5,), 0.2, dtype=torch.float64),
        torch.full((4,), 0.25).double(),
        torch.cdist(pos, neg),
    )
    x = torch.cat([pos, neg])  # (9, 2)
    y = torch.tensor([1] * 5 + [0] * 4)
    for _ in range(20):  # random 1-Lipschitz f: unit-norm linear maps and distances to a point
        u = torch.randn(2, generator=gen, dtype=torch.float64)
        c = torch.randn(2, generator=gen, dtype=torch.float64)
        for f in (x @ (u / u.norm()), (x - c).norm(dim=1)):
            assert kr_loss(f, y).item() >= -float(w1) - F64_TOL


def test_hkr_closed_form_and_gradient() -> None:
    f = torch.tensor(BINARY_LOGITS, requires_grad=True)
    y = torch.tensor([1, -1, 1])
    # Hinge (1 - y f)_+: (0, 3, 0), mean 1; hKR = -0.5 + 2 * 1.
    loss = HKRLoss(alpha=2.0, margin=1.0)(f, y)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    # KR gradient (-0.5, 1, -0.5) plus alpha * (1/B) on the active negative hinge.
    assert f.grad.tolist() == pytest.approx([-0.5, 1.0 + 2.0 / 3, -0.5])
    assert hkr_loss(f, y, alpha=0.0).item() == pytest.approx(BINARY_KR)


def test_multiclass_kr_closed_form() -> None:
    f = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    # Class 0: E_{y=0}[f_0] - E_{y!=0}[f_0] = 3 - 1; class 1: 2 - 0; mean 2, negated.
    y = torch.tensor([0, 1])
    assert multiclass_kr_loss(f, y).item() == pytest.approx(-2.0)
    assert MulticlassHKRLoss(alpha=0.0)(f, y).item() == pytest.approx(-2.0)


def test_multiclass_hinge_closed_form() -> None:
    f = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    # Sample 0: (2 (1 - 2)_+ + (1 - 1)_+ + (1 + 0)_+) / 3 = 1/3.
    # Sample 1: (2 (1 - 0)_+ + (1 + 0.5)_+ + (1 + 0)_+) / 3 = 4.5/3 = 1.5.
    per_sample = MulticlassHingeLoss(margin=1.0, reduction="none")(f, y)
    assert per_sample.tolist() == pytest.approx([1 / 3, 1.5])


def test_multiclass_hkr_is_kr_plus_alpha_hinge() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    expected = multiclass_kr_loss(f, y) + 0.3 * multiclass_hinge_loss(f, y, margin=0.7)
    torch.testing.assert_close(multiclass_hkr_loss(f, y, alpha=0.3, margin=0.7), expected)


def test_tau_cross_entropy_closed_form_and_limits() -> None:
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    assert tau_cross_entropy(f, y, tau=2.0).item() == pytest.approx(math.log1p(math.exp(-2)) / 2)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    torch.testing.assert_close(TauCrossEntropyLoss(tau=1.0)(f, y), F.cross_entropy(f, y))
    # Large tau: the margin hinge relu(max_{j != y} f_j - f_y), within log(C) / tau.
    tau = 1e4
    others = f.masked_fill(F.one_hot(y, 3).bool(), -math.inf).amax(dim=1)
    hinge = torch.relu(others - f.gather(1, y[:, None])[:, 0])
    gap = TauCrossEntropyLoss(tau, reduction="none")(f, y) - hinge
    assert bool((gap >= 0).all()) and bool((gap <= math.log(3) / tau).all())


def test_offset_cross_entropy_is_lmts_margin_with_a_temperature() -> None:
    """Lowering the target by the offset equals raising the others (CE is shift-invariant): with
    tau = 1 and offset sqrt(2) eps it is LMT's loss at L = 1; at large tau the hinge moves by the
    offset."""
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=gen)
    eps = 0.8
    offset_ce = tau_cross_entropy(f, y, tau=1.0, offset=math.sqrt(2) * eps, reduction="none")
    torch.testing.assert_close(offset_ce, lmt_loss(f, y, eps, 1.0, reduction="none"))
    tau, offset = 1e4, 0.5
    others = f.masked_fill(F.one_hot(y, 4).bool(), -math.inf).amax(dim=1)
    hinge = torch.relu(offset + others - f.gather(1, y[:, None])[:, 0])
    gap = TauCrossEntropyLoss(tau, reduction="none", offset=offset)(f, y) - hinge
    assert bool((gap >= -1e-12).all()) and bool((gap <= math.log(4) / tau).all())  # rounding


def test_lmt_closed_form_and_gradient_in_lipschitz() -> None:
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    lip = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    # Off-target logit raised by sqrt(2) * 0.5 * 2 = sqrt(2): CE = log(1 + exp(sqrt(2) - 1)).
    loss = lmt_loss(f, y, eps=0.5, lipschitz=lip)
    assert loss.item() == pytest.approx(math.log1p(math.exp(math.sqrt(2) - 1)))
    loss.backward()
    # dCE/dL = sqrt(2) eps (1 - p_y), p_y = softmax of the shifted logits.
    p_y = 1 / (1 + math.exp(math.sqrt(2) - 1))
    assert lip.grad.item() == pytest.approx(math.sqrt(2) * 0.5 * (1 - p_y))


def test_lmt_module_lipschitz_at_construction_or_per_call() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    fixed = LMTLoss(eps=0.3, lipschitz=1.5)(f, y)
    torch.testing.assert_close(LMTLoss(eps=0.3)(f, y, 1.5), fixed)
    torch.testing.assert_close(LMTLoss(eps=0.3)(f, y, torch.tensor(1.5)), fixed)
    torch.testing.assert_close(LMTLoss(eps=0.0, lipschitz=9.0)(f, y), F.cross_entropy(f, y))
    with pytest.raises(ValueError, match="no lipschitz"):
        LMTLoss(eps=0.3)(f, y)
    with pytest.raises(ValueError, match="fixed at construction"):
        LMTLoss(eps=0.3, lipschitz=1.5)(f, y, 1.5)


def _binary_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([0.3, -1.2, 0.8, 2.0]), torch.tensor([1, 0, 0, 1])


def _class_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=gen), torch.tensor([0, 2, 1, 2])


LOSS_MODULES = [
    (lambda r: KRLoss(reduction=r), _binary_batch),
    (lambda r: HKRLoss(0.5, 0.4, reduction=r), _binary_batch),
    (lambda r: MulticlassHingeLoss(0.4, reduction=r), _class_batch),
    (lambda r: MulticlassHKRLoss(0.5, 0.4, reduction=r), _class_batch),
    (lambda r: TauCrossEntropyLoss(5.0, reduction=r), _class_batch),
    (lambda r: LMTLoss(0.1, 2.0, reduction=r), _class_batch),
]


@pytest.mark.parametrize(("make", "batch"), LOSS_MODULES)
def test_reductions(make, batch) -> None:
    f, y = batch()
    per_sample = make("none")(f, y)
    assert per_sample.shape == (4,)
    torch.testing.assert_close(make("mean")(f, y), per_sample.mean())
    torch.testing.assert_close(make("sum")(f, y), per_sample.sum())
    with pytest.raises(ValueError, match="reduction"):
        make("avg")


_F2 = torch.zeros(3, 2)
_Y3 = torch.tensor([0, 1, 1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kr_loss(torch.zeros(3), torch.tensor([1, 0])), "batch sizes differ"),
        (lambda: kr_loss(torch.zeros(3, 2), _Y3), r"binary logits must have shape \(B,\)"),
        (lambda: kr_loss(torch.zeros(3), torch.zeros(3, 2)), r"binary targets must have shape"),
        (lambda: kr_loss(torch.zeros(3, dtype=torch.int64), _Y3), "floating point"),
        (lambda: kr_loss(torch.tensor([0.0, math.nan, 1.0]), _Y3), "NaN"),
        (lambda: kr_loss(torch.zeros(3), torch.tensor([0, 2, 1])), r"\{0, 1\}"),
        (lambda: kr_loss(torch.zeros(3), torch.tensor([0, -1, 1])), r"\{-1, \+1\}"),
        (lambda: kr_loss(torch.zeros(0), torch.zeros(0)), "empty batch"),
        (lambda: kr_loss([0.0, 1.0], _Y3), "torch.Tensor"),
        (lambda: multiclass_hinge_loss(_F2, torch.tensor([0, 1])), "batch sizes differ"),
        (lambda: multiclass_hinge_loss(_F2, _Y3.float()), "int64"),
        (lambda: multiclass_hinge_loss(_F2, _Y3.int()), "int64"),
        (lambda: multiclass_hinge_loss(torch.zeros(3, 1), _Y3 * 0), "C >= 2"),
        (lambda: multiclass_hinge_loss(torch.zeros(3), _Y3), r"shape \(B, C\)"),
        (lambda: multiclass_hinge_loss(_F2, _Y3[:, None]), r"targets must have shape \(B,\)"),
        (lambda: multiclass_hinge_loss(_F2, torch.tensor([0, 2, 1])), "class ids"),
        (lambda: multiclass_hkr_loss(torch.full((3, 2), math.nan), _Y3, 1.0), "NaN"),
        (lambda: tau_cross_entropy(torch.full((3, 2), math.inf), _Y3, 1.0), "NaN or inf"),
        (lambda: lmt_loss(torch.zeros(3, 2), _Y3, 0.1, torch.ones(2)), "one-element"),
        (lambda: lmt_loss(torch.zeros(3, 2), _Y3, 0.1, torch.tensor(-1.0)), ">= 0"),
    ],
)
def test_invalid_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: HKRLoss(alpha=-0.1), "alpha must be >= 0"),
        (lambda: HKRLoss(alpha=1.0, margin=0.0), "margin must be > 0"),
        (lambda: MulticlassHKRLoss(alpha=math.nan), "alpha must be finite"),
        (lambda: MulticlassHKRLoss(alpha="1"), "alpha must be a real number"),
        (lambda: MulticlassHingeLoss(margin=-1.0), "margin must be > 0"),
        (lambda: TauCrossEntropyLoss(tau=0.0), "tau must be > 0"),
        (lambda: TauCrossEntropyLoss(tau=1.0, offset=-0.5), "offset must be >= 0"),
        (lambda: LMTLoss(eps=-0.1), "eps must be >= 0"),
        (lambda: LMTLoss(eps=0.1, lipschitz=-2.0), "lipschitz must be >= 0"),
        (lambda: LMTLoss(eps=0.1, lipschitz=torch.tensor(1.0)), "lipschitz must be a real"),
        (lambda: hkr_loss(torch.zeros(3), _Y3, alpha=-1.0), "alpha must be >= 0"),
        (lambda: tau_cross_entropy(_F2, _Y3, tau=-1.0), "tau must be > 0"),
        (lambda: lmt_loss(_F2, _Y3, eps=-1.0, lipschitz=1.0), "eps must be >= 0"),
    ],
)
def test_invalid_hyperparameters_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@given(
    batch=st.integers(1, 8),
    classes=st.integers(2, 5),
    alpha=st.floats(0.0, 20.0),
    margin=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_agrees_with_deel_torchlip(
    batch: int, classes: int, alpha: float, margin: float, seed: int
) -> None:
    dl = pytest.importorskip("deel.torchlip.modules.loss")
    gen = torch.Generator().manual_seed(seed)
    f_bin = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    y_bin = torch.randint(0, 2, (batch, 1), generator=gen)
    f = torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    onehot = F.one_hot(y, classes)
    a_dl, m_dl = alpha / (1 + alpha), 2 * margin  # the documented mapping
    for red in ("none", "mean", "sum"):
        pairs = [
            (KRLoss(red)(f_bin, y_bin), dl.NegKRLoss(reduction=red)(f_bin, y_bin)),
            (
                HKRLoss(alpha, margin, red)(f_bin, y_bin),
                (1 + alpha) * dl.HKRLoss(a_dl, m_dl, reduction=red)(f_bin, y_bin),
            ),
            (
                MulticlassHingeLoss(margin, red)(f, y),
                dl.HingeMulticlassLoss(m_dl, reduction=red)(f, onehot),
            ),
            (
                MulticlassHKRLoss(alpha, margin, red)(f, y),
                (1 + alpha) * dl.HKRMulticlassLoss(a_dl, m_dl, reduction=red)(f, onehot),
            ),
            (
                TauCrossEntropyLoss(alpha + 0.1, red)(f, y),
                dl.TauCrossEntropyLoss(alpha + 0.1, reduction=red)(f, y),
            ),
        ]
        for ours, theirs in pairs:
            torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=0, atol=F64_TOL)
