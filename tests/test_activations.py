"""GroupSort / MaxMin: exact Jacobians (1-Lipschitz, gradient-norm preserving), values, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, jacobian_matrix, max_jacobian_norm
from torch import nn
from torch.autograd import forward_ad

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.nn.activations import ACTIVATIONS, GroupSort, MaxMin, _sort_groups, get_activation


def _reference_groupsort(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Descending sort of contiguous groups, computed with numpy (an independent implementation)."""
    arr = np.moveaxis(x.detach().numpy(), dim, -1)
    groups = arr.reshape(*arr.shape[:-1], -1, group_size)  # (..., C/g, g)
    ordered = -np.sort(-groups, axis=-1)
    return torch.from_numpy(np.moveaxis(ordered.reshape(arr.shape), -1, dim).copy())


@st.composite
def groupsort_cases(draw) -> tuple[int, int, tuple[int, ...]]:
    """(group_size, dim, input shape without batch): images or flat features, any sort dim."""
    group_size = draw(st.sampled_from([1, 2, 3, 4]))
    features = group_size * draw(st.integers(1, 3))
    if draw(st.booleans()):
        height, width = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        dim = draw(st.sampled_from([1, -1]))
        shape = (features, height, width) if dim == 1 else (2, height, features)
        return group_size, dim, shape
    return group_size, draw(st.sampled_from([1, -1])), (features,)


@given(groupsort_cases(), st.booleans())
def test_groupsort_jacobian_is_a_permutation(case, training: bool) -> None:
    group_size, dim, shape = case
    layer = GroupSort(group_size, dim).double().train(training)
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        jac = jacobian_matrix(layer, x)
        singular = torch.linalg.svdvals(jac)
        assert singular.max() <= 1 + LIPSCHITZ_TOL
        torch.testing.assert_close(singular, torch.ones_like(singular), rtol=0, atol=1e-12)
        assert set(jac.unique().tolist()) <= {0.0, 1.0}  # a permutation matrix


@pytest.mark.parametrize("group_size", [2, 4])
def test_ties_keep_a_permutation_jacobian(group_size: int) -> None:
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, -3.0, -3.0, 0.0, 0.0], dtype=torch.float64)
    jac = jacobian_matrix(GroupSort(group_size), x)
    torch.testing.assert_close(torch.linalg.svdvals(jac), torch.ones(8, dtype=torch.float64))


@given(groupsort_cases())
def test_groupsort_values_match_a_descending_sort(case) -> None:
    group_size, dim, shape = case
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(sum(shape)))
    expected = _reference_groupsort(x, group_size, dim % x.dim())
    torch.testing.assert_close(GroupSort(group_size, dim)(x), expected, rtol=0, atol=0)


def test_maxmin_convention_is_max_then_min() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    torch.testing.assert_close(MaxMin()(x), torch.tensor([[3.0, 1.0, 2.0, -1.0]]))
    torch.testing.assert_close(GroupSort(4)(x), torch.tensor([[3.0, 2.0, 1.0, -1.0]]))


def test_maxmin_equals_groupsort_2_with_and_without_grad() -> None:
    x = torch.randn(4, 6, 5, 3, requires_grad=True)
    grad_out = torch.randn(4, 6, 5, 3)
    (grad_fast,) = torch.autograd.grad(MaxMin()(x), x, grad_out)
    (grad_sort,) = torch.autograd.grad(_sort_groups(x, 2, 1), x, grad_out)
    torch.testing.assert_close(grad_fast, grad_sort, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(MaxMin()(x), _sort_groups(x, 2, 1), rtol=0, atol=0)


def test_maxmin_output_can_be_written_in_place_in_training() -> None:
    """A residual block's ``out += identity`` after MaxMin (an autograd view error before)."""
    x = torch.randn(4, 6, 3, requires_grad=True)
    grad_out = torch.randn(4, 6, 3)
    out = MaxMin()(x)
    out += x
    (grad_fast,) = torch.autograd.grad(out, x, grad_out)
    (grad_sort,) = torch.autograd.grad(_sort_groups(x, 2, 1) + x, x, grad_out)
    torch.testing.assert_close(grad_fast, grad_sort, rtol=0, atol=0)


def test_maxmin_forward_mode_matches_the_sort_path() -> None:
    x = torch.randn(3, 6, 2, requires_grad=True)
    tangent = torch.randn(3, 6, 2)
    with forward_ad.dual_level():
        fast = forward_ad.unpack_dual(MaxMin()(forward_ad.make_dual(x, tangent))).tangent
        dual = forward_ad.make_dual(x.detach(), tangent)
        reference = forward_ad.unpack_dual(_sort_groups(dual, 2, 1)).tangent
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


def test_maxmin_gradient_penalty_matches_the_sort_path() -> None:
    """A gradient penalty differentiates through MaxMin's backward (double backward)."""
    torch.manual_seed(0)
    first, last = nn.Linear(5, 8), nn.Linear(8, 1)
    x = torch.randn(6, 5, requires_grad=True)

    def penalty_grads(activation) -> tuple[torch.Tensor, ...]:
        out = last(activation(first(x))).sum()
        (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), (first.weight, last.weight))

    fast = penalty_grads(MaxMin())
    reference = penalty_grads(lambda h: _sort_groups(h, 2, 1))
    for got, expected in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8, 3, 3, dtype=dtype, requires_grad=True)
    for layer in (MaxMin(), GroupSort(4)):
        out = layer(x)
        out.sum().backward()
        assert out.dtype == dtype and x.grad.dtype == dtype


def test_bound_and_export() -> None:
    for layer in (GroupSort(3), MaxMin(dim=-1)):
        assert layer.lipschitz_bound() == 1.0
        assert layer.export() is layer
    assert lipschitz_upper_bound(nn.Sequential(GroupSort(4), MaxMin()), input_shape=(8, 3)) == 1.0


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True, "2"])
def test_bad_group_size_raises(group_size) -> None:
    with pytest.raises(ValueError, match="group_size"):
        GroupSort(group_size)


def test_bad_dim_raises() -> None:
    with pytest.raises(ValueError, match="dim"):
        GroupSort(2, dim="channels")


def test_wrong_input_shape_names_layer_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"GroupSort\(group_size=4.*\(2, 6, 5, 5\).*6 features"):
        GroupSort(4)(torch.zeros(2, 6, 5, 5))
    with pytest.raises(ValueError, match=r"MaxMin\(dim=1\).*\(2, 5\).*group_size=2"):
        MaxMin()(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"MaxMin\(dim=3\).*\(2, 4\).*no dimension 3"):
        MaxMin(dim=3)(torch.zeros(2, 4))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_named_activation_is_1_lipschitz(name: str) -> None:
    layer = get_activation(name)
    assert max_jacobian_norm(layer, (4, 3, 2)) <= 1 + LIPSCHITZ_TOL
    assert lipschitz_upper_bound(layer, input_shape=(4, 3, 2)) == 1.0


def test_get_activation_names_and_arguments() -> None:
    assert type(get_activation("Max_Min")) is MaxMin
    assert type(get_activation("relu")) is nn.ReLU
    layer = get_activation("group-sort", group_size=4, dim=-1)
    assert isinstance(layer, GroupSort) and (layer.group_size, layer.dim) == (4, -1)
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'.*groupsort"):
        get_activation("gelu")


@pytest.mark.parametrize("layer", [GroupSort(2), GroupSort(4), MaxMin()])
def test_one_lipschitz_in_linf_on_random_pairs(layer):
    """lipschitz_norm = "any": the l_inf bound of 1 holds too (sorting is l_inf-1-Lipschitz)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen, dtype=torch.float64)
    x2 = x + torch.randn(512, 8, generator=gen, dtype=torch.float64) * 0.3
    ratio = (layer(x) - layer(x2)).abs().amax(1) / (x - x2).abs().amax(1)
    assert layer.lipschitz_norm == "any" and ratio.max() <= 1 + 1e-12


def test_groupsort_refuses_the_batch_dimension():
    with pytest.raises(ValueError, match="dim 0 is the batch dimension"):
        GroupSort(2, dim=0)
    layer = MaxMin(dim=-2)  # resolves to the batch dimension of (B, F) inputs
    with pytest.raises(ValueError, match="dim 0 is the batch dimension"):
        layer(torch.randn(4, 6))
    assert layer(torch.randn(3, 4, 6)).shape == (3, 4, 6)  # dim 1 of (B, C, F)


@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 2, 2)])
def test_maxmin_under_vmap_and_per_sample_gradients(shape) -> None:
    """The fast path writes both halves in place (out=), which vmap has no rule for: under
    function transforms the same values come from the stacked halves."""
    layer = MaxMin()
    x = torch.randn(shape, dtype=torch.float64)
    expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.vmap(layer)(x[:, None])[:, 0], expected)
    torch.testing.assert_close(torch.vmap(layer)(x[:, None].requires_grad_())[:, 0], expected)
    weights = torch.randn(shape[1:], dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(lambda v: (layer(v[None])[0] * weights).sum()))(x)
    x.requires_grad_(True)
    (whole,) = torch.autograd.grad((layer(x) * weights).sum(), x)
    torch.testing.assert_close(per_sample, whole)
