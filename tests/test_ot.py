"""lipcert.ot and the hKR plumbing: W1 against POT's exact value and closed forms, soundness of
the KR lower bound, the 1-Lipschitz GroupSort architectures, the binary-task config options, the
``lipcert w1`` command and its errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps, jacobian_spectral_norm
from sklearn.datasets import make_moons
from torch import nn

from lipcert.cli import main
from lipcert.config import ConfigError, load_config, parse_config
from lipcert.data import Dataset, Split
from lipcert.export import export
from lipcert.losses import HKRLoss, KRLoss
from lipcert.models.hkr import gnp_mlp
from lipcert.nn.head import RowNormLinear
from lipcert.nn.orthogonal import OrthoLinear
from lipcert.ot import (
    LIPSCHITZ_TOLERANCE,
    as_point_cloud,
    check_one_lipschitz,
    exact_wasserstein1,
    kantorovich_value,
    logit_lipschitz_bound,
    wasserstein1,
)
from lipcert.train import make_loss, select_classes

#: Targets of issue 7: the estimate within 2% of the exact W1 in 2-D and 5% in 64-D.
REL_TOL_2D = 0.02
REL_TOL_64D = 0.05
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: Float64 slack of "the KR value never exceeds the exact W1" (sums of ~1000 terms).
SOUND_SLACK = 1e-9


def _exact(x, y) -> float:
    """POT's exact W1 (POT is an optional peer: the test is skipped without it)."""
    pytest.importorskip("ot")
    return exact_wasserstein1(x, y)


def _moons(n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    points, labels = make_moons(2 * n, noise=0.1, random_state=0)
    return points[labels == 0], points[labels == 1]


def _embed(points: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """An isometric embedding into R^dim by a random orthonormal frame (W1 unchanged)."""
    frame, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, points.shape[1])))
    return points @ frame.T


def _check_estimate(x, y, exact: float, rel_tol: float) -> None:
    estimate = wasserstein1(x, y)
    assert estimate.distance <= exact * (1 + SOUND_SLACK)  # a lower bound, always
    assert estimate.distance >= exact * (1 - rel_tol), (estimate.distance, exact)
    assert 1 - 1e-3 <= estimate.lipschitz <= 1 + LIPSCHITZ_TOL


# --- accuracy: POT and closed forms -----------------------------------------------------------


def test_two_moons_2d_within_2_percent_of_pot():
    x, y = _moons()
    _check_estimate(x, y, _exact(x, y), REL_TOL_2D)


def test_two_moons_in_64d_within_5_percent_of_pot():
    """A 64-D cloud of low intrinsic dimension: the estimator must find the plane."""
    x, y = _moons()
    x, y = _embed(x, 64), _embed(y, 64)
    _check_estimate(x, y, _exact(x, y), REL_TOL_64D)


def test_translation_closed_form_in_64d():
    """y = x + m: the empirical W1 is exactly ||m|| (identity coupling vs. the potential <u, z>)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 64))
    shift = rng.standard_normal(64)
    shift *= 2.0 / np.linalg.norm(shift)
    _check_estimate(x, x + shift, 2.0, REL_TOL_2D)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ring", "unequal", "gaussians_4d_in_64d"])
def test_more_clouds_against_pot(case):
    rng = np.random.default_rng(2)
    if case == "ring":
        angle = rng.uniform(0, 2 * np.pi, 1000)
        x = 2 * np.c_[np.cos(angle), np.sin(angle)] + 0.05 * rng.standard_normal((1000, 2))
        y, tol = 0.3 * rng.standard_normal((1000, 2)), REL_TOL_2D
    elif case == "unequal":
        x, y = rng.standard_normal((700, 2)), rng.uniform(-1, 3, (1300, 2))
        tol = REL_TOL_2D
    else:
        x = _embed(rng.standard_normal((1000, 4)), 64)
        y = _embed(rng.standard_normal((1000, 4)) + np.array([3.0, 0, 0, 0]), 64)
        tol = REL_TOL_64D
    _check_estimate(x, y, _exact(x, y), tol)


# --- soundness of the KR value ---------------------------------------------------------------


@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    dim=st.integers(1, 5),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_kantorovich_value_never_exceeds_exact_w1(n, m, dim, scale, seed):
    """Any potential, 1-Lipschitz or not, gives a lower bound once divided by its bound."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=gen), torch.randn(m, dim, generator=gen) + 0.5
    torch.manual_seed(seed)
    potential = nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        potential[0].weight.mul_(scale)
    assert kantorovich_value(potential, x, y) <= _exact(x, y) + SOUND_SLACK


def test_kantorovich_value_of_a_linear_potential_is_its_projection():
    x, y = torch.randn(50, 3), torch.randn(40, 3) + 1
    potential = nn.Linear(3, 1)
    with torch.no_grad():
        potential.weight.copy_(torch.tensor([[3.0, 0.0, 4.0]]))  # norm 5: divided out
    expected = float(
        (x.double().mean(0) - y.double().mean(0)) @ torch.tensor([0.6, 0, 0.8]).double()
    )
    assert kantorovich_value(nn.Sequential(potential), x, y) == pytest.approx(expected, rel=1e-6)


def test_minibatch_training_and_seed_are_reproducible_and_leave_the_global_rng_alone():
    x, y = _moons(200)
    state = torch.get_rng_state()
    first = wasserstein1(x, y, steps=30, batch_size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    second = wasserstein1(x, y, steps=30, batch_size=32, seed=5)
    assert first.distance == second.distance
    assert 0 < first.distance <= _exact(x, y) * (1 + SOUND_SLACK)


def test_given_potential_is_trained_in_place():
    x, y = _moons(100)
    potential = gnp_mlp([2], 2, width=16, depth=2, binary=True)
    before = kantorovich_value(potential, x, y)
    estimate = wasserstein1(x, y, potential=potential, steps=100)
    assert estimate.potential is potential and not potential.training
    assert estimate.distance > before


# --- the 1-Lipschitz architecture ------------------------------------------------------------


@given(
    features=st.integers(2, 6),
    width=st.sampled_from([4, 8]),
    depth=st.integers(1, 3),
    group_size=st.sampled_from([2, 4]),
    binary=st.booleans(),
    train_mode=st.booleans(),
)
def test_gnp_mlp_logits_are_1_lipschitz_at_init_and_after_adversarial_steps(
    features, width, depth, group_size, binary, train_mode
):
    torch.manual_seed(0)
    model = gnp_mlp([features], 2 if binary else 3, width, depth, group_size, binary).double()
    for stage in ("init", "adversarial"):
        if stage == "adversarial":
            adversarial_steps(model, (features,))
        model.train(train_mode)
        bound = logit_lipschitz_bound(model)
        assert bound <= 1 + LIPSCHITZ_TOLERANCE
        x = torch.randn(features, dtype=torch.float64)
        for k in range(model[-1].out_features):
            norm = jacobian_spectral_norm(nn.Sequential(model, _Select(k)), x)
            assert norm <= 1 + LIPSCHITZ_TOL and norm <= bound, (stage, norm, bound)
    model.eval()
    x = torch.randn(5, features, dtype=torch.float64)
    assert (export(model)(x) - model(x)).abs().max() <= 1e-5


class _Select(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return x[..., self.k : self.k + 1]


def test_gnp_mlp_arguments():
    with pytest.raises(ValueError, match="binary=True needs num_classes == 2"):
        gnp_mlp([4], 3, binary=True)
    with pytest.raises(ValueError, match="depth"):
        gnp_mlp([4], 2, depth=0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        gnp_mlp([4], 2, width=6, group_size=4)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((0, 2)), np.zeros((3, 2)), "x is empty"),
        (np.zeros((3, 2)), np.zeros((3, 0)), "y is empty"),
        (np.zeros((3, 2)), np.zeros((3, 3)), "same dimension"),
        (np.array([[0.0, np.nan]]), np.zeros((3, 2)), "NaN"),
        (np.zeros((3, 2)), np.array([[np.inf, 0.0]]), "NaN or inf"),
        (np.zeros(3), np.zeros(3), r"shape \(n, d\)"),
        (np.array([["a", "b"]]), np.zeros((1, 2)), "real numbers"),
        ([[0.0, 1.0]], np.zeros((1, 2)), "numpy array or a torch tensor"),
    ],
)
def test_bad_point_clouds_are_refused(x, y, message):
    with pytest.raises(ValueError, match=message):
        wasserstein1(x, y, steps=1)


def test_non_1_lipschitz_or_unboundable_potentials_are_refused():
    x, y = np.zeros((3, 2)), np.ones((3, 2))
    doubled = nn.Linear(2, 1)
    with torch.no_grad():
        doubled.weight.copy_(torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="not 1-Lipschitz"):
        wasserstein1(x, y, potential=nn.Sequential(doubled), steps=1)
    with pytest.raises(ValueError, match="cannot bound"):
        wasserstein1(x, y, potential=nn.Sequential(nn.Linear(2, 1), nn.LayerNorm(1)), steps=1)
    with pytest.raises(ValueError, match="one value a point"):
        wasserstein1(x, y, potential=gnp_mlp([2], 3, width=4, depth=1), steps=1)
    with pytest.raises(ValueError, match="not 1-Lipschitz"):
        check_one_lipschitz(nn.Sequential(doubled), "this model")


def test_relu_potential_warns_that_it_loses_gradient_norm():
    relu = nn.Sequential(OrthoLinear(2, 4), nn.ReLU(), RowNormLinear(4, 1))
    with pytest.warns(UserWarning, match="not gradient-norm preserving"):
        wasserstein1(np.zeros((3, 2)), np.ones((3, 2)), potential=relu, steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_training_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wasserstein1(np.zeros((3, 2)), np.ones((3, 2)), **kwargs)


def test_exact_w1_without_pot_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match="POT"):
        exact_wasserstein1(np.zeros((2, 2)), np.ones((2, 2)))


def test_as_point_cloud_converts_to_float32():
    cloud = as_point_cloud("x", np.arange(6, dtype=np.int64).reshape(3, 2))
    assert cloud.dtype == torch.float32 and cloud.shape == (3, 2)


# --- the command line ------------------------------------------------------------------------


def test_cli_w1_with_exact(tmp_path, capsys):
    pytest.importorskip("ot")
    x, y = _moons(150)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    rc = main(["w1", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--steps", "200", "--exact"])
    out = capsys.readouterr().out
    assert rc == 0 and "W1 estimate" in out and "W1 exact (POT)" in out
    estimate = float(out.split("W1 estimate: ")[1].split()[0])
    exact = float(out.split("W1 exact (POT): ")[1].split()[0])
    assert exact * 0.9 <= estimate <= exact * (1 + 1e-6)


def test_cli_w1_errors(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((3, 5)))
    assert main(["w1", str(tmp_path / "a.npy"), str(tmp_path / "missing.npy")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["w1", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 2
    assert "same dimension" in capsys.readouterr().err
    (tmp_path / "c.npy").write_text("not an array")
    assert main(["w1", str(tmp_path / "c.npy"), str(tmp_path / "a.npy")]) == 2
    assert "c.npy" in capsys.readouterr().err


# --- hKR training plumbing: binary losses, class selection, configs ---------------------------


def test_make_loss_knows_the_binary_losses():
    assert isinstance(make_loss(parse_config({"loss": {"name": "kr"}}).loss), KRLoss)
    loss = make_loss(parse_config({"loss": {"name": "hkr", "kwargs": {"alpha": 5}}}).loss)
    assert isinstance(loss, HKRLoss) and loss.alpha == 5.0


def test_select_classes_relabels_in_the_given_order():
    x = torch.arange(12, dtype=torch.float32)[:, None]
    labels = torch.arange(12) % 4
    data = Dataset("toy", Split(x, labels), Split(x, labels), ("a", "b", "c", "d"))
    picked = select_classes(data, [3, 1])
    assert picked.class_names == ("d", "b")
    assert picked.train.x[:, 0].tolist() == [1, 3, 5, 7, 9, 11]
    assert picked.train.y.tolist() == [1, 0, 1, 0, 1, 0]
    assert select_classes(data, []) is data
    for bad, message in (([1, 1], "distinct"), ([0], "at least 2"), ([0, 4], "0..3")):
        with pytest.raises(ValueError, match=message):
            select_classes(data, bad)


def test_config_classes_are_integers():
    assert parse_config({"data": {"classes": [0, 8]}}).data.classes == [0, 8]
    with pytest.raises(ConfigError, match=r"data\.classes must be a list of ints"):
        parse_config({"data": {"classes": [0.5, 8]}})
    assert parse_config({"certify": {"eps": [1, 0.5]}}).certify.eps == [1.0, 0.5]


@pytest.mark.parametrize("name", ["moons_hkr", "mnist08_hkr", "mnist08_ce", "mnist_hkr"])
def test_shipped_configs_parse(name):
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.name == name and math.isfinite(config.optim.lr)
