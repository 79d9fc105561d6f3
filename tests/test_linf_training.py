"""l_inf-distance nets end to end: the loss, the registered model, certification (margin / 2,
finite p, linear head, l2 conversion) checked by PGD, float rounding, training + resume, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lipcert
from lipcert.attacks import pgd
from lipcert.certify import certify, logit_rounding_bound, summarize
from lipcert.config import LossConfig, load_config, parse_config
from lipcert.data import Dataset, Split
from lipcert.losses import LinfDistLoss, certified_margins, clipped_hinge, linf_dist_loss
from lipcert.models import build_model
from lipcert.nn.linf import LinfDist, Negate, set_p
from lipcert.train import CHECKPOINT_NAME, make_loss, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: Toy problem: 3 classes in 8 dimensions, class centers 2 apart in l_inf.
FEATURES, CLASSES = 8, 3


def _toy(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    centers = torch.eye(CLASSES, FEATURES) * 2.0
    return centers[y] + 0.3 * torch.randn(n, FEATURES, generator=gen), y


def _trained(head: str = "negate", steps: int = 150, bind: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = build_model(  # half the steps at p = inf, so the running means settle
        "linf_dist_net",
        input_shape=[FEATURES],
        num_classes=CLASSES,
        width=16,
        depth=3,
        head=head,
        hold=0.0,
        ramp_end=0.5,
    )
    loss_fn = LinfDistLoss(hinge_threshold=1.0, ce_scale=4.0, ce_weight=0.5)
    if bind:  # as lipcert.train does
        loss_fn.bind(model, (FEATURES,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = _toy(256, seed=1)
    for step in range(steps):
        lipcert.train.set_progress([*model.modules(), loss_fn], step / steps)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_loss_values_and_clipping():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9], [0.0, 1.0, 5.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0])  # margins 2, 0.1, -5
    hinge = clipped_hinge(logits, y, threshold=1.0)
    torch.testing.assert_close(hinge, torch.tensor([0.0, 0.9, 1.0]))
    (grad,) = torch.autograd.grad(hinge.sum(), logits)
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0  # certified / clipped
    torch.testing.assert_close(grad[1], torch.tensor([0.0, -1.0, 1.0]))
    mixed = linf_dist_loss(logits, y, 1.0, ce_scale=2.0, ce_weight=0.5, reduction="none")
    ce = nn.functional.cross_entropy(2.0 * logits, y, reduction="none")
    torch.testing.assert_close(mixed, hinge + 0.5 * ce)
    total = linf_dist_loss(logits, y, 1.0, 2.0, 0.5, reduction="sum")
    torch.testing.assert_close(total, mixed.sum())


def test_mix_decays_with_progress_and_loss_is_in_the_config():
    loss = make_loss(LossConfig("linf_dist", {"hinge_threshold": 0.9, "ce_weight": 0.4}))
    assert isinstance(loss, LinfDistLoss) and loss.mix == 0.4
    loss.set_progress(0.25)
    assert loss.mix == pytest.approx(0.3)
    loss.set_progress(1.0)
    assert loss.mix == 0.0
    early = LinfDistLoss(0.9, ce_weight=1.0, decay_end=0.5)
    early.set_progress(0.6)
    assert early.mix == 0.0
    for bad in ({"hinge_threshold": 0.0}, {"hinge_threshold": 1.0, "ce_scale": -1.0}):
        with pytest.raises(ValueError):
            LinfDistLoss(**bad)


def test_geometric_mix_holds_then_decays_to_its_end_value():
    loss = LinfDistLoss(0.9, ce_weight=0.05, ce_weight_end=0.0002, decay_start=0.1, decay_end=0.9)
    loss.set_progress(0.05)
    assert loss.mix == 0.05
    loss.set_progress(0.5)  # half way: the geometric mean of the two ends
    assert loss.mix == pytest.approx((0.05 * 0.0002) ** 0.5)
    loss.set_progress(0.95)
    assert loss.mix == pytest.approx(0.0002)
    with pytest.raises(ValueError, match="decay_start"):
        LinfDistLoss(0.9, decay_start=0.5, decay_end=0.5)
    with pytest.raises(ValueError, match="ce_weight_end"):
        LinfDistLoss(0.9, ce_weight=0.0, ce_weight_end=0.1)


def _scale_head(model: nn.Sequential, factor: float) -> None:
    with torch.no_grad():
        for tensor in model[-1].parameters():
            tensor.mul_(factor)


def test_bound_hinge_behind_a_linear_head_ignores_the_head_scale():
    model = _trained("linear", steps=100)
    x, y = _toy(64, seed=7)
    bound = LinfDistLoss(hinge_threshold=2.0, ce_weight=0.0, reduction="none")
    bound.bind(model, (FEATURES,))
    raw = LinfDistLoss(hinge_threshold=2.0, ce_weight=0.0, reduction="none")
    hinge, raw_hinge = bound(model(x), y), raw(model(x), y)
    assert ((hinge > 0) & (hinge < 2)).float().mean() > 0.5
    assert not bound.state_dict()  # the head is the model's: no weights in the loss's state
    _scale_head(model, 10.0)
    torch.testing.assert_close(bound(model(x), y), hinge)
    assert not torch.allclose(raw(model(x), y), raw_hinge)  # the raw margin scales with the head
    bound(model(x), y).mean().backward()
    grad = model[-1].weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bound_margin_is_twice_the_certified_radius():
    model = _trained("linear").double()
    x, y = _toy(300, seed=2)
    x = x.double()
    loss = LinfDistLoss(hinge_threshold=1.0)
    set_p(model, 8.0)  # mid-training: bind reads the body at the p training ends at (inf)
    loss.bind(model, (FEATURES,))
    assert all(float(m.p) == 8.0 for m in model.modules() if isinstance(m, LinfDist))
    set_p(model, math.inf)
    logits = model(x).detach()
    radii = certify(model, x, y, norm="linf")
    right = logits.argmax(1) == y
    assert right.float().mean() > 0.9 and (radii > 0.3).float().mean() > 0.5
    half = loss.margins(logits, y) / 2
    torch.testing.assert_close(radii[right], half[right].float())
    assert (half[~right] <= 0).all()


def test_negate_head_loss_is_unchanged_by_bind():
    model = build_model(
        "linf_dist_net", input_shape=[FEATURES], num_classes=CLASSES, width=16, depth=3
    )
    x, y = _toy(64, seed=8)
    bound = LinfDistLoss(hinge_threshold=1.0, ce_scale=4.0, ce_weight=0.5)
    bound.bind(model, (FEATURES,))
    results = []
    for loss in (bound, lambda f, t: linf_dist_loss(f, t, 1.0, 4.0, 0.5)):
        model.zero_grad()
        value = loss(model(x), y)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    (bound_value, bound_grads), (raw_value, raw_grads) = results
    assert torch.equal(bound_value, raw_value) and raw_value > 0
    assert all(torch.equal(a, b) for a, b in zip(bound_grads, raw_grads, strict=True))


def test_certified_margins_gradient_and_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, CLASSES, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(CLASSES, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    torch.autograd.gradcheck(
        lambda f, w: certified_margins(f, y, torch.cdist(w, w, p=1)), (logits, weight)
    )
    hybrid = build_model(
        "linf_dist_net", input_shape=[FEATURES], num_classes=CLASSES, width=16, head="linear"
    )
    bound = LinfDistLoss(hinge_threshold=1.0)
    bound.bind(hybrid, (FEATURES,))
    with pytest.raises(ValueError, match=r"\(4, 4\) tensor for logits of 4 classes, got \(3, 3\)"):
        bound(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pair_bounds"):
        certified_margins(torch.randn(2, 3), torch.tensor([0, 1]), [[0.0] * 3] * 3)
    body = nn.Sequential(nn.Linear(FEATURES, 8), nn.Linear(8, CLASSES))
    with pytest.raises(ValueError, match=r"0 \(Linear\) has parameters in the body"):
        bound.bind(body, (FEATURES,))


def test_certified_margins_of_float16_logits_have_finite_gradients():
    """float16 rounds the floor of the pair bounds (1e-12) to 0: the target's ratio was 0 / 0,
    and the gradients of the logits (one NaN a sample) and of the head's weight were NaN."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, CLASSES, generator=gen).half().requires_grad_()
    weight = torch.randn(CLASSES, 6, generator=gen).half().requires_grad_()
    y = torch.tensor([0, 1, 2, 0, 1])
    margin = certified_margins(logits, y, torch.cdist(weight.float(), weight.float(), p=1))
    margin.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.isfinite(margin).all() and margin.dtype == torch.float32
    wide = certified_margins(
        logits.detach().float(), y, torch.cdist(weight.float(), weight.float(), p=1)
    )
    torch.testing.assert_close(margin, wide, rtol=0, atol=0)


def test_model_structure_and_validation():
    model = build_model("linf_dist_net", input_shape=[1, 4, 4], num_classes=3, width=8, depth=4)
    assert model(torch.rand(5, 1, 4, 4)).shape == (5, 3)
    dists = [m for m in model if isinstance(m, LinfDist)]
    assert len(dists) == 4 and isinstance(model[-1], Negate)
    assert all(d.mean_shift for d in dists[:-1]) and dists[-1].bias is not None
    diagonal = dists[1].weight.diagonal()
    assert (diagonal < 0).all() and dists[1].weight.sum() == diagonal.sum()  # identity init
    hybrid = build_model("linf_dist_net", input_shape=[6], num_classes=3, width=8, head="linear")
    assert isinstance(hybrid[-1], nn.Linear)
    with pytest.raises(ValueError, match="head"):
        build_model("linf_dist_net", input_shape=[6], num_classes=3, head="mlp")
    with pytest.raises(ValueError, match="depth"):
        build_model("linf_dist_net", input_shape=[6], num_classes=3, depth=1)


def test_save_and_load_keep_p_and_outputs(tmp_path):
    model = _trained(steps=5)
    set_p(model, 8.0)
    x = torch.randn(4, FEATURES)
    lipcert.save(model, tmp_path / "m.safetensors")
    loaded = lipcert.load(tmp_path / "m.safetensors")
    assert all(float(m.p) == 8.0 for m in loaded.modules() if isinstance(m, LinfDist))
    torch.testing.assert_close(loaded(x), model(x))


def _safety(logits: Tensor, x: Tensor, lipschitz: float, model: nn.Module) -> Tensor:
    """certify's margin safety: 3 * delta_margin, delta_margin = 2 * the logit rounding bound."""
    zero_scale = summarize(model, "linf", tuple(x.shape[1:])).zero_input_scale
    bound = logit_rounding_bound(logits.double(), x.double(), lipschitz, torch.float32, zero_scale)
    return 6 * bound


def test_certify_is_margin_over_two_and_l2_is_the_same_number():
    model = _trained()
    x, y = _toy(300, seed=2)
    logits = model(x).detach()
    top2 = logits.double().topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    expected = (margin - _safety(logits, x, 1.0, model)) / 2
    radii = certify(model, x, y, norm="linf")
    right = logits.argmax(1) == y
    assert right.float().mean() > 0.9 and (radii > 0.3).float().mean() > 0.5
    torch.testing.assert_close(radii[right], expected[right].float())
    torch.testing.assert_close(certify(model, x, y, norm="l2"), radii)  # ||.||_inf <= ||.||_2


def test_certify_before_p_reaches_inf_uses_the_lp_bound():
    model = _trained()
    x, y = _toy(100, seed=3)
    radius_inf = certify(model, x, y, norm="linf")
    set_p(model, 8.0)
    logits = model(x).detach()
    lipschitz = math.prod(m.lipschitz_bound() for m in model if isinstance(m, LinfDist))
    assert lipschitz == pytest.approx(FEATURES ** (1 / 8) * 16 ** (2 / 8))
    top2 = logits.double().topk(2, dim=1).values
    expected = (top2[:, 0] - top2[:, 1] - _safety(logits, x, lipschitz, model)) / (2 * lipschitz)
    radii = certify(model, x, y, norm="linf")
    right = logits.argmax(1) == y
    torch.testing.assert_close(radii[right], expected[right].float())
    assert radii.max() < radius_inf.max()


@pytest.mark.parametrize("head", ["negate", "linear"])
def test_pgd_linf_never_breaks_a_certified_point(head):
    model = _trained(head)
    x, y = _toy(200, seed=4)
    radii = certify(model, x, y, norm="linf")
    ok = radii > 0
    assert ok.sum() >= 50
    _, success = pgd(model, x[ok], y[ok], radii[ok], "linf", steps=50, restarts=2)
    assert not success.any()
    if head == "negate":  # the margin / 2 certificate is nearly tight for a trained net
        _, outside = pgd(model, x[ok], y[ok], 3 * radii[ok], "linf", steps=50, restarts=2)
        assert outside.any()


def test_rounding_bound_covers_float64_recomputation():
    model = _trained()
    x, _ = _toy(200, seed=5)
    logits32 = model(x).detach()
    logits64 = model.double()(x.double()).detach()
    err = (logits32.double() - logits64).abs().amax(1)
    assert (
        err * 10 < logit_rounding_bound(logits32.double(), x.double(), 1.0, torch.float32)
    ).all()


def _dataset() -> Dataset:
    x, y = _toy(160, seed=6)
    return Dataset("toy", Split(x[:128], y[:128]), Split(x[128:], y[128:]), ("a", "b", "c"))


def _config(**overrides):
    raw = {
        "epochs": 8,
        "seed": 1,
        "data": {"batch_size": 32},
        "model": {"name": "linf_dist_net", "kwargs": {"width": 16, "depth": 3, "ramp_end": 0.5}},
        "loss": {"name": "linf_dist", "kwargs": {"hinge_threshold": 1.0, "ce_scale": 4.0}},
        "optim": {"name": "adam", "lr": 0.05},
        "certify": {"norm": "linf", "eps": [0.3]},
    }
    raw.update(overrides)
    return parse_config(raw)


def test_training_follows_the_schedule_and_resumes_exactly(tmp_path):
    model, history = train(_config(), tmp_path / "full", data=_dataset())
    assert all(math.isinf(float(m.p)) for m in model.modules() if isinstance(m, LinfDist))
    assert history[-1]["clean_acc"] > 0.9 and history[-1]["cert_acc@0.3"] > 0.5
    train(_config(), tmp_path / "split", data=_dataset(), stop_after_epochs=3)
    train(_config(), tmp_path / "split", data=_dataset(), resume=True)
    full = lipcert.load(tmp_path / "full" / CHECKPOINT_NAME).state_dict()
    split = lipcert.load(tmp_path / "split" / CHECKPOINT_NAME).state_dict()
    assert all(torch.equal(full[k], split[k]) for k in full)


@pytest.mark.parametrize("name", ["mnist_linf_cpu.toml", "mnist_linf_full.toml"])
def test_configs_parse_and_build(name):
    config = load_config(CONFIGS / name)
    assert config.loss.name == "linf_dist" and config.certify.norm == "linf"
    assert 0.3 in config.certify.eps
    model = build_model(
        config.model.name,
        input_shape=[1, 28, 28],
        num_classes=10,
        **{**config.model.kwargs, "width": 8, "depth": 3},
    )
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    make_loss(config.loss)
