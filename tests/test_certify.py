import math

import pytest
import torch
from torch import nn

import lipcert
from lipcert.attacks import pgd, wrong_class_margin
from lipcert.bounds import gram_spectral_bound
from lipcert.certify import (
    certified_accuracy,
    certify,
    certify_batched,
    clear_summary_cache,
    logit_rounding_bound,
)
from lipcert.nn.constrained import BoundedWeightConstraint, ConstrainedLinear


class _Spectral(BoundedWeightConstraint):
    def constrain(self, weight):
        return weight / gram_spectral_bound(weight)

    def operator_bound(self, layer, weight):
        return float(gram_spectral_bound(weight))


def _net(head=True, seed=0):
    torch.manual_seed(seed)
    layers = [
        ConstrainedLinear(6, 32, constraint=_Spectral()),
        nn.ReLU(),
        ConstrainedLinear(32, 32, constraint=_Spectral()),
        nn.ReLU(),
    ]
    last = nn.Linear(32, 4) if head else ConstrainedLinear(32, 4, constraint=_Spectral())
    return nn.Sequential(*layers, last)


def _data(n=200, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize("head", [True, False])
def test_misclassified_points_have_nonpositive_radius(head):
    model = _net(head)
    x, y = _data()
    radii = certify(model, x, y)
    wrong = model(x).argmax(1) != y
    assert wrong.any() and (radii[wrong] <= 0).all()
    assert (radii[~wrong] > 0).any()


def test_head_form_is_tighter_than_sqrt2_form():
    model = _net(head=True)
    x, y = _data()
    tight = certify(model, x, y)
    loose = certify(model, x, y, lipschitz=lipcert.lipschitz_upper_bound(model))
    ok = tight > 0.01  # margins far above the rounding slack, which differs between the forms
    assert ok.sum() >= 10
    assert (tight[ok] >= loose[ok]).all() and (tight[ok] > loose[ok]).any()


@pytest.mark.parametrize("head", [True, False])
def test_pgd_at_the_radius_never_breaks_a_certificate(head):
    model = _net(head)
    x, y = _data()
    radii = certify(model, x, y)
    ok = radii > 0
    _, success = pgd(model, x[ok], y[ok], radii[ok] * (1 - 1e-6), "l2", steps=60, restarts=3)
    assert not success.any()


def test_radius_is_exact_for_a_linear_model():
    """With an identity body the last-layer certificate is exact: 1.01 x radius breaks points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 4))
    x, y = _data()
    radii = certify(model, x, y)
    ok = radii > 0.1  # well above the rounding slack
    _, inside = pgd(model, x[ok], y[ok], radii[ok] * (1 - 1e-6), "l2", steps=60, restarts=2)
    _, outside = pgd(model, x[ok], y[ok], radii[ok] * 1.05, "l2", steps=100, restarts=5)
    assert not inside.any() and outside.float().mean() > 0.9


def test_rounding_bound_covers_float64_recomputation():
    model = _net()
    x, _ = _data()
    logits32 = model(x).detach()
    body = lipcert.lipschitz_upper_bound(model[:-1])
    logits64 = model.double()(x.double()).detach()
    err = (logits32.double() - logits64).abs().amax(1)
    bound = logit_rounding_bound(logits32.double(), x.double(), body, torch.float32)
    assert (err * 10 < bound).all()


def test_float32_radii_of_a_float64_model_are_rounded_down():
    """A float64 model's allowance is ~2^-43 relative: the float32 radius must not round up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 4)).double()
    x = torch.randn(4000, 6, dtype=torch.float64)
    y = model(x).argmax(1).detach()
    radii = certify(model, x, y)
    exact = (model(x).gather(1, y[:, None]) - model(x)).detach()  # margins, float64
    weight = model[1].weight.detach()
    pair = torch.cdist(weight, weight)[y]  # ||w_y - w_j||, the exact pair Lipschitz constants
    exact_radius = (exact / pair).masked_fill(pair == 0, math.inf).amin(1)
    assert radii.dtype == torch.float32 and (radii.double() <= exact_radius).all()
    assert (radii.double() > exact_radius * (1 - 1e-6)).all()  # and only by the float slack


def test_rounding_allowance_covers_large_constants_that_cancel():
    """A bias of 3e4 that the head's bias cancels: float32 intermediates ~3e4 resolve the logits
    only to ~2e-3, yet without the zero-input term the allowance (~6e-5) certified 0.0025, broken
    at 0.0021."""
    body, head = nn.Linear(8, 8), nn.Linear(8, 2)
    with torch.no_grad():
        body.weight.copy_(torch.eye(8))
        body.bias.fill_(3e4)
        head.weight.zero_()
        head.weight[1, 0], head.weight[0, 1] = 1.0, 1.0
        head.bias.fill_(-3e4)
    model = nn.Sequential(body, head).eval()
    x = torch.zeros(1, 8)
    x[0, 0] = 0.003
    delta = torch.zeros(1, 8)
    delta[0, 0] = -0.0021
    assert model(x + delta).argmax(1).item() == 0  # the float32 model flips at 0.0021
    assert certify(model, x, torch.tensor([1])).item() < 0.0021


def test_rounding_allowance_covers_values_in_the_subnormal_range():
    """Weights of 1e-43 put the first layer's outputs in float32's subnormal range (steps of
    2^-149, no relative precision) and later layers scale them back by 1e43: the logit 0.012
    computes as 0.014, and 0.0097 was certified, broken at 0.0055."""
    layers = [nn.Linear(2, 2, bias=False) for _ in range(3)] + [nn.Linear(2, 1, bias=False)]
    with torch.no_grad():
        for layer, scale in zip(layers, (1e-43, 1e21, 1e22), strict=False):
            layer.weight.copy_(torch.eye(2) * scale)
        layers[-1].weight.copy_(torch.tensor([[1.0, -1.0]]))
    model = nn.Sequential(*layers).eval()
    x = torch.tensor([[0.012, 0.0]])
    assert model(x + torch.tensor([[-0.0055, 0.0]])).item() <= 0  # class 0: the float32 model flips
    assert certify(model, x, torch.tensor([1])).item() < 0.0055


def test_linf_radius_is_l2_over_sqrt_d():
    model = _net()
    x, y = _data()
    r2, rinf = certify(model, x, y, "l2"), certify(model, x, y, "linf")
    ok = r2 > 0
    assert torch.allclose(rinf[ok], r2[ok] / math.sqrt(6))
    _, success = pgd(model, x[ok], y[ok], rinf[ok], "linf", steps=60, restarts=2)
    assert not success.any()


def test_bound_is_cached_and_follows_weight_changes():
    model = _net()
    x, y = _data(20)
    r1 = certify(model, x, y)
    with torch.no_grad():
        model[-1].weight.mul_(2)
    r2 = certify(model, x, y)
    assert not torch.allclose(r1, r2)


@pytest.mark.parametrize("change", ["data", "numpy"])
def test_cached_bound_follows_changes_that_bump_no_version(change):
    """``p.data.mul_`` and writes through a NumPy view leave ``p._version`` alone: the cached bound
    must still be recomputed, or the radii would be those of the unscaled net."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x, y = _data(20)
    certify(model, x, y)  # caches the bound of the unscaled net
    weight = model[0].weight
    version = weight._version
    if change == "data":
        weight.data.mul_(3)
    else:
        weight.detach().numpy()[:] *= 3
    assert weight._version == version
    y = model(x).argmax(1)
    cached = certify(model, x, y)
    clear_summary_cache(model)
    assert torch.equal(cached, certify(model, x, y))


class _ListScaled(nn.Module):
    """f(x) = 1 + s x_1 with s held in a list: fx captures s as a constant of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = [torch.tensor(1.0)]

    def forward(self, x):
        return 1.0 + x[:, 1:2] * self.scales[0]


def test_cached_bound_follows_an_in_place_change_of_a_captured_constant():
    """The trace's constants are compared by value like the parameters (the bound of s = 1 was
    kept when s became 100: radius 0.999, broken at 0.02)."""
    model = _ListScaled().eval()
    x, y = torch.zeros(1, 2), torch.tensor([1])
    assert certify(model, x, y).item() > 0.9
    model.scales[0].fill_(100.0)
    assert certify(model, x, y).item() < 0.011


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.full((2, 6), math.nan), torch.tensor([0, 1]), "NaN"),
        (torch.zeros(2, 6, dtype=torch.int64), torch.tensor([0, 1]), "floating"),
        (torch.zeros(2, 6), torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(2, 6), torch.tensor([0, 1, 2]), "shape"),
        (torch.zeros(2, 6), torch.tensor([0, 7]), "labels"),
    ],
)
def test_bad_inputs(x, y, match):
    with pytest.raises(ValueError, match=match):
        certify(_net(), x, y)


def test_bad_norm_and_lipschitz():
    x, y = _data(4)
    with pytest.raises(ValueError, match="norm"):
        certify(_net(), x, y, norm="l1")
    with pytest.raises(ValueError, match="lipschitz"):
        certify(_net(), x, y, lipschitz=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        certify(_net(), torch.zeros(2, 5), torch.tensor([0, 1]))


def test_certified_accuracy_and_batching():
    model = _net()
    x, y = _data()
    radii = certify(model, x, y)
    assert torch.equal(certify_batched(model, x, y, batch_size=37), radii)
    acc = certified_accuracy(radii, [0.0, 0.1, 10.0])
    clean = float((model(x).argmax(1) == y).float().mean())
    assert acc[0.0] == pytest.approx(float((radii > 0).float().mean())) and acc[0.0] <= clean
    assert acc[0.0] >= acc[0.1] >= acc[10.0]
    with pytest.raises(ValueError, match="empty"):
        certify_batched(model, x[:0], y[:0])


def test_wrong_class_margin():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
    assert torch.equal(wrong_class_margin(logits, torch.tensor([0, 1])), torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize("outputs", [1, 2])
def test_binary_and_two_class_models_are_sound(outputs):
    """One logit: class 1 iff f > 0 (margin +-f); two logits: the sqrt(2) form still applies."""
    torch.manual_seed(0)
    body = [ConstrainedLinear(6, 16, constraint=_Spectral()), nn.ReLU()]
    model = nn.Sequential(*body, ConstrainedLinear(16, outputs, constraint=_Spectral()))
    x, _ = _data()
    y = (model(x)[:, -1] > (0 if outputs == 1 else model(x)[:, 0])).long()
    y[:20] = 1 - y[:20]  # some misclassified points
    for lipschitz in (None, lipcert.lipschitz_upper_bound(model)):
        radii = certify(model, x, y, lipschitz=lipschitz)
        assert (radii[:20] <= 0).all()
        assert (radii[20:] > 0).float().mean() > 0.9  # the rest: tiny margins within the slack
        ok = radii > 0
        if outputs == 1:  # binary wrapper for the attack: logits (0, f)
            attacked = nn.Sequential(model, _Binary())
        else:
            attacked = model
        _, success = pgd(attacked, x[ok], y[ok], radii[ok] * (1 - 1e-6), "l2", steps=60)
        assert not success.any()


class _Binary(nn.Module):
    def forward(self, f):
        return torch.cat([torch.zeros_like(f), f], dim=1)


def test_two_logit_radius_uses_sqrt2():
    """A 2-logit model with a user-given L gets margin / (sqrt(2) L), not margin / L."""
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[0.0, 1.0]])
    r = certify(model, x, torch.tensor([1]), lipschitz=1.0)
    assert r.item() == pytest.approx(1 / math.sqrt(2), rel=5e-3)
