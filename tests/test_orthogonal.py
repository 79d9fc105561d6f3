"""OrthoLinear: norm <= 1 (exact Jacobians), near-orthogonality, presets, export, state, cache."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL
from test_spectral import (
    check_eval_cache_follows_updates,
    check_export,
    check_float32_weight_is_covered,
    check_sound_before_and_after_adversarial_steps,
    check_state_dict_round_trip,
    check_train_mode_backpropagates,
)
from torch import nn

from lipcert.bounds.operator import gram_spectral_bound
from lipcert.nn.orthogonal import BJORCK_PRESETS, OrthoLinear, bjorck_orthogonalizer

#: Documented preset tolerances (BJORCK_PRESETS docstring): ||W^T W - I||_2, float64.
PRESET_TOLERANCE = {
    "orthogonal + noise": {"fast": 2e-8, "default": 1e-14, "precise": 1e-14, "adaptive": 1e-14},
    "torch default": {"precise": 1e-14},
}
#: Relative size of the noise added to an orthogonal start (a weight moved by training).
NOISE = 0.3

features = st.integers(1, 6)
presets = st.sampled_from(["fast", "default", "precise", "adaptive", 0, 3])


def _ortho(in_features=5, out_features=4, seed=0, dtype=torch.float32, **kwargs) -> OrthoLinear:
    torch.manual_seed(seed)
    return OrthoLinear(in_features, out_features, dtype=dtype, **kwargs)


def _defect(weight: torch.Tensor) -> float:
    """||W^T W - I||_2 on the smaller Gram matrix."""
    gram = weight.mT @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.mT
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return float(torch.linalg.matrix_norm(gram - eye, ord=2))


@given(features, features, presets)
def test_norm_is_at_most_one_at_init_and_after_adversarial_steps(n_in, n_out, bjorck_iters):
    layer = OrthoLinear(n_in, n_out, bjorck_iters=bjorck_iters)
    check_sound_before_and_after_adversarial_steps(layer, (n_in,))


@given(features, features, presets)
def test_float32_weight_is_covered_by_its_bound(n_in, n_out, bjorck_iters):
    check_float32_weight_is_covered(_ortho(n_in, n_out, bjorck_iters=bjorck_iters), (n_in,))


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 16), (24, 8), (8, 24)])
def test_orthogonal_and_gradient_norm_preserving_during_training(n_in, n_out):
    layer = _ortho(n_in, n_out, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for step in range(4):
        with torch.no_grad():
            weight = layer.weight
            assert _defect(weight) <= LIPSCHITZ_TOL
            bound = layer.lipschitz_bound()
        assert 1 <= bound <= 1 + LIPSCHITZ_TOL  # tight thanks to the semi-unitary bound
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, n_in, dtype=torch.float64, generator=gen, requires_grad=True)
        out = layer(x)
        if n_out >= n_in:  # orthonormal columns: ||W x|| = ||x||
            torch.testing.assert_close(out - layer.bias, x @ weight.T)
            torch.testing.assert_close((out - layer.bias).norm(dim=1), x.norm(dim=1))
        grad_out = torch.randn_like(out)
        (grad_in,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
        if n_out <= n_in:  # orthonormal rows: ||W^T g|| = ||g||
            torch.testing.assert_close(grad_in.norm(dim=1), grad_out.norm(dim=1))
        opt.zero_grad()
        (-out.square().sum()).backward()
        opt.step()


@pytest.mark.parametrize("n", [64, 256])
def test_presets_reach_their_documented_tolerance(n):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        starts = {
            "orthogonal + noise": nn.init.orthogonal_(torch.empty(n, n, dtype=torch.float64),
                                                      generator=gen)
            + NOISE / math.sqrt(n) * torch.randn(n, n, dtype=torch.float64, generator=gen),
            "torch default": nn.init.kaiming_uniform_(torch.empty(n, n, dtype=torch.float64),
                                                      a=math.sqrt(5), generator=gen),
        }  # fmt: skip
        for start, tolerances in PRESET_TOLERANCE.items():
            for preset, tolerance in tolerances.items():
                assert _defect(BJORCK_PRESETS[preset](starts[start])) <= tolerance


def test_each_bjorck_step_keeps_the_norm_at_most_one():
    weight = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in range(8):
        result = bjorck_orthogonalizer(steps)(weight * 100)
        assert torch.linalg.matrix_norm(result, ord=2) <= 1 + LIPSCHITZ_TOL
    assert torch.equal(bjorck_orthogonalizer(0)(weight), weight / gram_spectral_bound(weight))


def test_export_state_cache_and_training():
    check_export(_ortho(), (5,), nn.Linear)
    check_state_dict_round_trip(_ortho, (5,))
    check_eval_cache_follows_updates(_ortho, (5,))
    check_train_mode_backpropagates(_ortho(), (5,))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bjorck_iters": "exact"}, "bjorck_iters"),
        ({"bjorck_iters": -1}, "bjorck_iters"),
        ({"bjorck_iters": 2.5}, "bjorck_iters"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _ortho(**kwargs)


def test_wrong_input_shape_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match="OrthoLinear") as err:
        _ortho()(torch.zeros(2, 4))
    assert "(*, 5)" in str(err.value) and "(2, 4)" in str(err.value)
