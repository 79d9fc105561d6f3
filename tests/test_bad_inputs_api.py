"""Bad arguments of the Python API (attacks, bounds, certification, explanations, W1): each
raises one ValueError naming the argument and what is wrong, through the validators that
:func:`lipcert.certify` uses for x and y (:func:`lipcert.certify.check_inputs`,
:func:`lipcert.certify.check_eps`) and the shared knob checks of :mod:`lipcert.losses.base`; the
good values around them keep working."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lipcert
from lipcert.attacks import minimal_adversarial_distance, pgd
from lipcert.certify import certify_batched
from lipcert.explain import counterfactuals
from lipcert.ot import exact_wasserstein1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


X, Y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
UPPER = torch.ones(5)


def _mad(**kwargs):
    args = {"x": X, "y": Y, "upper": UPPER} | kwargs
    return minimal_adversarial_distance(_model(), args.pop("x"), args.pop("y"), **args)


def _lower(x=X, **kwargs):
    return lipcert.lipschitz_lower_bound(_model(), x, **kwargs)


CASES = [
    # F8: pgd
    ("pgd: negative eps", lambda: pgd(_model(), X, Y, -1.0), "eps values must be finite"),
    ("pgd: NaN eps", lambda: pgd(_model(), X, Y, math.nan), "eps values must be finite"),
    ("pgd: inf eps", lambda: pgd(_model(), X, Y, math.inf), "eps values must be finite"),
    ("pgd: eps beyond float32", lambda: pgd(_model(), X, Y, 1e300), "eps values must be finite"),
    ("pgd: per-sample eps length", lambda: pgd(_model(), X, Y, torch.ones(3)), "eps must be"),
    ("pgd: eps of another type", lambda: pgd(_model(), X, Y, "0.5"), "eps must be"),
    ("pgd: y length", lambda: pgd(_model(), X, Y[:3], 0.5), "y must have shape (5,)"),
    ("pgd: integer x", lambda: pgd(_model(), X.long(), Y, 0.5), "x must be a floating-point"),
    ("pgd: NaN x", lambda: pgd(_model(), X.clone().fill_(math.nan), Y, 0.5), "x contains NaN"),
    ("pgd: steps 0", lambda: pgd(_model(), X, Y, 0.5, steps=0), "steps must be an int >= 1"),
    ("pgd: steps -1", lambda: pgd(_model(), X, Y, 0.5, steps=-1), "steps must be an int >= 1"),
    ("pgd: steps 2.5", lambda: pgd(_model(), X, Y, 0.5, steps=2.5), "steps must be an int >= 1"),
    ("pgd: restarts 0", lambda: pgd(_model(), X, Y, 0.5, restarts=0), "restarts must be an int"),
    ("pgd: restarts 1.5", lambda: pgd(_model(), X, Y, 0.5, restarts=1.5), "restarts must be"),
    ("pgd: clamp reversed", lambda: pgd(_model(), X, Y, 0.5, clamp=(1.0, 0.0)), "clamp must be"),
    # F8: minimal_adversarial_distance
    ("distance: upper a string", lambda: _mad(upper="1.0"), "upper must be a number"),
    ("distance: upper negative", lambda: _mad(upper=-UPPER), "upper values must be finite"),
    ("distance: upper NaN", lambda: _mad(upper=UPPER * math.nan), "upper values must be finite"),
    ("distance: upper 0", lambda: _mad(upper=0 * UPPER), "upper values must be > 0"),
    ("distance: upper length", lambda: _mad(upper=UPPER[:3]), "upper must be a number or"),
    (
        "distance: upper overflows when doubled",
        lambda: _mad(upper=UPPER * 1e38, doublings=3),
        "upper * 2**doublings must stay finite",
    ),
    ("distance: y length", lambda: _mad(y=Y[:3]), "y must have shape (5,)"),
    ("distance: integer x", lambda: _mad(x=X.long()), "x must be a floating-point"),
    ("distance: steps 0", lambda: _mad(steps=0), "steps must be an int >= 1"),
    ("distance: restarts 0", lambda: _mad(restarts=0), "restarts must be an int >= 1"),
    ("distance: bisections -1", lambda: _mad(bisections=-1), "bisections must be an int >= 0"),
    ("distance: doublings 1.5", lambda: _mad(doublings=1.5), "doublings must be an int >= 0"),
    # F9: lipschitz_lower_bound
    ("lower: NaN x", lambda: _lower(torch.full((2, 4), math.nan)), "x contains NaN"),
    ("lower: empty x", lambda: _lower(torch.empty(0, 4)), "x must be a non-empty batch"),
    ("lower: integer x", lambda: _lower(torch.ones(2, 4, dtype=torch.long)), "floating-point"),
    ("lower: NumPy x", lambda: _lower(np.ones((2, 4), np.float32)), "numpy.ndarray"),
    ("lower: float64 x", lambda: _lower(X.double()), "does not accept inputs of shape (1, 4)"),
    ("lower: x of the wrong size", lambda: _lower(torch.rand(2, 7)), "does not accept inputs"),
    ("lower: n_power 0", lambda: _lower(n_power=0), "n_power must be an int >= 1"),
    ("lower: n_power -1", lambda: _lower(n_power=-1), "n_power must be an int >= 1"),
    ("lower: n_ascent -1", lambda: _lower(n_ascent=-1), "n_ascent must be an int >= 0"),
    ("lower: step NaN", lambda: _lower(step=math.nan), "step must be finite"),
    # F10: certify_batched
    ("batched: batch_size 0", lambda: certify_batched(_model(), X, Y, batch_size=0), "batch_size"),
    ("batched: batch_size -1", lambda: certify_batched(_model(), X, Y, batch_size=-1), "batch_si"),
    ("batched: batch_size 2.5", lambda: certify_batched(_model(), X, Y, batch_size=2.5), "batch_"),
    # the other public functions
    ("bound: size -1", lambda: lipcert.lipschitz_upper_bound(_model(), (-1,)), "input_shape[0]"),
    ("bound: size 0", lambda: lipcert.lipschitz_upper_bound(_model(), (0,)), "input_shape[0]"),
    ("bound: size 2.5", lambda: lipcert.lipschitz_upper_bound(_model(), (2.5,)), "input_shape[0]"),
    ("bound: shape an int", lambda: lipcert.lipschitz_upper_bound(_model(), 4), "input_shape"),
    ("certify: 0-d x", lambda: lipcert.certify(_model(), torch.tensor(1.0), Y), "x must be a"),
    ("certify: lipschitz str", lambda: lipcert.certify(_model(), X, Y, lipschitz="1"), "lipschi"),
    (
        "accuracy: NumPy radii",
        lambda: lipcert.certified_accuracy(np.ones(3), [0.1]),
        "radii must be a torch.Tensor",
    ),
    (
        "accuracy: eps a number",
        lambda: lipcert.certified_accuracy(torch.ones(3), 0.1),
        "eps must be a list",
    ),
    (
        "accuracy: eps strings",
        lambda: lipcert.certified_accuracy(torch.ones(3), ["a"]),
        "eps must be a list",
    ),
    ("counterfactuals: max_steps 2.5", lambda: counterfactuals(_model(), X, 2.5), "max_steps"),
    ("counterfactuals: overshoot str", lambda: counterfactuals(_model(), X, 5, "a"), "overshoot"),
    (
        "exact W1: max_iterations 0",
        lambda: exact_wasserstein1(torch.rand(4, 2), torch.rand(4, 2), max_iterations=0),
        "max_iterations must be an int >= 1",
    ),
]


@pytest.mark.parametrize(("name", "call", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_argument_has_one_clear_value_error(name, call, pattern):
    with pytest.raises(ValueError) as info:
        call()
    assert pattern in str(info.value), str(info.value)


def test_good_eps_forms_still_attack():
    """A number, a 0-d tensor and one value per sample give the same search; an empty batch an
    empty answer; eps 0 is a valid (empty) ball."""
    model = _model()
    _, with_float = pgd(model, X, Y, 0.3, steps=3, restarts=1)
    _, with_scalar = pgd(model, X, Y, torch.tensor(0.3), steps=3, restarts=1)
    _, per_sample = pgd(model, X, Y, torch.full((5,), 0.3), steps=3, restarts=1)
    assert torch.equal(with_float, with_scalar) and torch.equal(with_float, per_sample)
    x_adv, success = pgd(model, X[:0], Y[:0], 0.3, steps=3, restarts=1)
    assert x_adv.shape == (0, 4) and success.shape == (0,)
    x_adv, _ = pgd(model, X, Y, 0.0, steps=3, restarts=1, clamp=(0.0, 1.0))
    assert torch.equal(x_adv, X)


def test_minimal_distance_takes_a_number_as_upper():
    model = _model()
    as_tensor = minimal_adversarial_distance(model, X, Y, torch.full((5,), 0.5), steps=5)
    as_number = minimal_adversarial_distance(model, X, Y, 0.5, steps=5)
    assert torch.equal(as_tensor, as_number)


def test_lower_bound_runs_float64_models_on_float64_inputs():
    model = _model().double()
    bound = lipcert.lipschitz_lower_bound(model, X.double(), n_power=50, n_ascent=0)
    exact = float(torch.linalg.matrix_norm(model[1].weight, ord=2))
    assert exact * (1 - 1e-6) <= bound <= exact * (1 + 1e-12)


def test_good_batch_sizes_and_eps_lists_keep_their_results():
    model = _model()
    radii = lipcert.certify(model, X, Y)
    assert torch.equal(certify_batched(model, X, Y, batch_size=1000), radii)
    by_three = certify_batched(model, X, Y, batch_size=3)
    assert torch.equal(certify_batched(model, X, Y, batch_size=np.int64(3)), by_three)
    parameterless = nn.Sequential(nn.Flatten())  # 4 logits of the input itself
    assert certify_batched(parameterless, X, torch.zeros(5, dtype=torch.long)).shape == (5,)
    expected = lipcert.certified_accuracy(radii, [0.0, 0.7])
    for eps in ((0.0, 0.7), np.array([0.0, 0.7]), torch.tensor([0.0, 0.7], dtype=torch.float64)):
        assert lipcert.certified_accuracy(radii, eps) == expected


@pytest.mark.parametrize("eps", [[0.1, 0.2], np.array([0.1, 0.2]), np.array(0.1), (0.1, 0.2)])
def test_pgd_takes_eps_as_a_list_or_an_array(eps):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    _, success = pgd(model, x, y, eps, steps=2, restarts=1)
    assert success.shape == (2,)
