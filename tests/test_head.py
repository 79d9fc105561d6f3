"""RowNormLinear: unit rows, sound spectral and pairwise bounds, export, state and eval cache."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import adversarial_steps, max_jacobian_norm
from test_spectral import (
    check_eval_cache_follows_updates,
    check_export,
    check_float32_weight_is_covered,
    check_sound_before_and_after_adversarial_steps,
    check_state_dict_round_trip,
    check_train_mode_backpropagates,
)
from torch import nn

from lipcert.bounds.operator import pairwise_row_distance_bound
from lipcert.nn.head import RowNormLinear

features = st.integers(1, 6)


def _head(in_features=6, out_features=4, seed=0, dtype=torch.float32) -> RowNormLinear:
    torch.manual_seed(seed)
    return RowNormLinear(in_features, out_features, dtype=dtype)


def _exact_distance_squared(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    """||a - b||^2 in exact rational arithmetic from the floats' exact values."""
    return sum((Fraction(float(x)) - Fraction(float(y))) ** 2 for x, y in zip(a, b, strict=True))


@given(features, features)
def test_bound_covers_the_exact_jacobian_at_init_and_after_adversarial_steps(n_in, n_out):
    # Not 1-Lipschitz: the limit is sqrt(out_features) (unit rows), the bound is measured.
    layer = RowNormLinear(n_in, n_out)
    check_sound_before_and_after_adversarial_steps(layer, (n_in,), limit=math.sqrt(n_out))


@given(features, features)
def test_float32_weight_is_covered_by_its_bound(n_in, n_out):
    check_float32_weight_is_covered(_head(n_in, n_out), (n_in,), limit=math.sqrt(n_out))


def test_rows_have_unit_norm_and_the_layer_can_exceed_one():
    layer = _head(3, 8, dtype=torch.float64).eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.ones(8, 3))  # eight equal rows
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert max_jacobian_norm(layer, (3,)) == pytest.approx(math.sqrt(8))
    assert layer.lipschitz_bound() >= math.sqrt(8)


@pytest.mark.parametrize("magnitude", [1e-23, 1e-20, 1e20])
def test_rows_of_extreme_magnitude_still_have_unit_norm(magnitude):
    """float32 rows ~1e-23 had norm 5.9e14 (their squares underflowed), ~1e20 norm 0 (overflow);
    the gradient stays that of w / ||w|| (the map is scale-invariant)."""
    layer = _head(6, 4)
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        raw[1:].mul_(magnitude)
    norms = layer.weight.double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    (layer.weight * torch.arange(24.0).view(4, 6)).sum().backward()
    exact = raw.detach().double().requires_grad_()
    (exact / exact.norm(dim=1, keepdim=True) * torch.arange(24.0).view(4, 6)).sum().backward()
    for got, want in zip(raw.grad.double(), exact.grad, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@given(features, features, st.integers(0, 1000))
def test_pairwise_bounds_cover_the_exact_row_distances(n_in, n_out, seed):
    layer = _head(n_in, n_out, seed=seed)
    adversarial_steps(layer, (n_in,))
    layer.eval()
    bound = layer.pairwise_row_distance_bound()
    assert bound.dtype == torch.float64 and bound.shape == (n_out, n_out)
    with torch.no_grad():
        weight = layer.weight  # the float32 rows the forward uses
    for i in range(n_out):
        for j in range(n_out):
            exact = _exact_distance_squared(weight[i], weight[j])
            assert Fraction(float(bound[i, j])) ** 2 >= exact
            assert float(bound[i, j]) <= math.sqrt(float(exact)) * (1 + 1e-12) + 1e-150


def test_pairwise_bound_is_chunked_without_changing_values(monkeypatch):
    weight = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = pairwise_row_distance_bound(weight)
    monkeypatch.setattr("lipcert.bounds.operator.PAIRWISE_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(pairwise_row_distance_bound(weight), full, rtol=0, atol=0)


def test_pairwise_bound_has_no_cancellation_with_many_rows():
    """torch.cdist's matrix-product mode (> 25 rows) returns 0 for nearby rows: not here."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 16, generator=gen, dtype=torch.float64) * 1e3
    weight[1] = weight[0]
    weight[1, 3] += 7e-9
    assert pairwise_row_distance_bound(weight)[0, 1] >= 7e-9
    l1 = pairwise_row_distance_bound(weight, p=1.0)
    exact_l1 = (weight[:, None] - weight[None]).abs().sum(-1)
    assert (l1 >= exact_l1).all()


def test_export_state_cache_and_training():
    check_export(_head(), (6,), nn.Linear)
    check_state_dict_round_trip(_head, (6,))
    check_eval_cache_follows_updates(_head, (6,))
    check_train_mode_backpropagates(_head(), (6,))


@pytest.mark.parametrize(("kwargs", "name"), [({"in_features": 0}, "in_features"),
                                              ({"out_features": -1}, "out_features")])  # fmt: skip
def test_bad_constructor_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _head(**kwargs)


def test_wrong_input_shape_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match="RowNormLinear") as err:
        _head()(torch.zeros(3, 5))
    assert "(*, 6)" in str(err.value) and "(3, 5)" in str(err.value)
