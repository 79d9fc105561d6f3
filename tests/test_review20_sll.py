"""Review of the SLL layers, the exported SLL form and the bound of ``Residual`` (twentieth
session): residuals whose branch broadcasts, weights that overflow the form's bound, and the eval
cache of SLL's T after state changes, against exact float64 Jacobian norms."""

from __future__ import annotations

import io
import math

import pytest
import torch
from lipschitz import jacobian_spectral_norm
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.export import export
from lipcert.nn import Residual
from lipcert.nn.residual import sll_form
from lipcert.nn.sll import SLLConv2d, SLLLinear
from lipcert.ot import check_one_lipschitz, kantorovich_value


def _broadcasting_potential() -> nn.Module:
    """f(z) = 0.5 sum_k (z + 0 z)_k on 1-d points: the residual copies z to 4 entries, so f = 2 z
    (Lipschitz 2), which x + branch(x) computes by broadcasting x (1 entry) to the branch's 4."""
    residual, head = Residual(nn.Linear(1, 4)), nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        residual.branch.weight.zero_(), residual.branch.bias.zero_(), head.weight.fill_(0.5)
    return nn.Sequential(residual, head).double()


def test_a_residual_whose_branch_broadcasts_is_refused():
    """The rule 1 + L(branch) holds for x + g(x) with x and g(x) of one shape. Broadcasting
    repeats one of them: Residual(Linear(1, 4)) with zero weights is x -> (x, x, x, x), Lipschitz
    2, and was bounded by 1.0 (no input shape); the potential above passed the 1-Lipschitz check
    and its Kantorovich value between the points 0 and 1 was 2.0, where W1 is 1."""
    potential = _broadcasting_potential()
    x = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Residual.*\[3, 4\].*\[3, 1\]"):
        potential(x)
    with pytest.raises(ValueError, match="Residual"):
        kantorovich_value(potential, x, torch.zeros_like(x))
    shrinking = Residual(nn.Linear(4, 1)).double()  # g(x) repeated: 1 + sqrt(4) ||w||
    with pytest.raises(ValueError, match="Residual"):
        shrinking(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Residual"):
        lipschitz_upper_bound(shrinking, (4,))
    same = Residual(nn.Identity())  # x + x: shapes agree, the rule holds
    assert torch.equal(same(x), 2 * x) and lipschitz_upper_bound(same) == 2.0


def _form(inner_weight: list, outer_weight: list) -> Residual:
    """x - B^T relu(A x), A = ``inner_weight``, B = ``outer_weight`` (float64)."""
    a, b = (torch.tensor(w, dtype=torch.float64) for w in (inner_weight, outer_weight))
    inner = nn.Linear(a.shape[1], a.shape[0], dtype=torch.float64)
    outer = nn.Linear(a.shape[0], a.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        inner.weight.copy_(a), inner.bias.zero_(), outer.weight.copy_(-b.T)
    return Residual(nn.Sequential(inner, nn.ReLU(), outer))


def test_a_form_whose_inner_norm_overflows_gets_no_nan_bound():
    """A = diag(1e200, 1), B = diag(3e-200, 1): x - B^T relu(A x) has the Jacobian
    diag(-2, 1) at x = (0.5, 0), norm 2. ||A||^2 overflows to inf, the unit with the huge row
    gets no fitted scale and no deficit, and max(N) ||A||^2 was 0 * inf: the bound was NaN, which
    the 1-Lipschitz check of lipcert.ot let through (NaN > 1 is False)."""
    form = _form([[1e200, 0.0], [0.0, 1.0]], [[3e-200, 0.0], [0.0, 1.0]])
    assert sll_form(form)
    x = torch.tensor([0.5, 0.0], dtype=torch.float64)
    assert jacobian_spectral_norm(form, x) == pytest.approx(2.0)
    assert lipschitz_upper_bound(form) >= 2.0  # inf: sound, and not NaN
    head = nn.Linear(2, 1, bias=False).double()
    with pytest.raises(ValueError, match="not 1-Lipschitz"):
        check_one_lipschitz(nn.Sequential(form, head), "the potential")


@pytest.mark.parametrize("seed", range(4))
def test_a_form_with_overflowing_gram_is_bounded_not_crashed(seed):
    """An SLL layer's units rescaled by s_i and 1 / s_i (the same map, 1-Lipschitz: relu is
    positively homogeneous) with s_i from 1e-190 to 1e100: |B B^T| overflowed to inf and NaN,
    and the Perron weights' eigh raised LinAlgError."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    scales = 2 / ((a @ a.T).abs().sum(dim=1) * (1 + 1e-4))  # an SLL layer with q = 1
    s = torch.tensor([1e-160, 1e-190, 1.0, 1e100], dtype=torch.float64)[:, None]
    form = _form((a * s).tolist(), (scales[:, None] * a / s).tolist())
    bound = lipschitz_upper_bound(form)
    assert bound >= 1 - 1e-12 and not math.isnan(bound)


@pytest.fixture
def swap_on_conversion():
    """torch's future conversion mode: ``load_state_dict`` and ``.to()`` swap the tensors in
    place (``torch.utils.swap_tensors``; the path torch always takes for wrapper subclasses)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize(
    ("make", "shape"), [(lambda: SLLLinear(4, 6), (3, 4)), (lambda: SLLConv2d(2, 3), (2, 2, 4, 5))]
)
def test_the_eval_cache_lets_torch_swap_the_weights(make, shape, swap_on_conversion):
    """swap_tensors refuses a tensor with a weak reference, which the eval cache held on the
    weight and log q after one eval forward or bound: load_state_dict and .double() raised
    RuntimeError ("Couldn't swap SLLLinear.weight"), and pickling the layer (torch.save of the
    module) raised TypeError. After the swaps the layer computes, bounds and exports the new
    weights."""
    layer, twin = make().eval(), make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(twin.state_dict())
        assert torch.equal(layer(x), twin(x))
        assert layer.lipschitz_bound() == twin.lipschitz_bound()
        layer.double(), twin.double()
        assert torch.equal(layer(x.double()), twin(x.double()))
        assert torch.equal(export(layer)(x.double()), export(twin)(x.double()))
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x.double()), twin(x.double()))


def test_the_residual_rule_rounds_its_sum_up():
    """x + 2^-60 x has the slope 1 + 2^-60; the module rule returned 1.0 + 2^-60 rounded to
    nearest, 1.0, below it (the traced graph rounds up: 1 + 2^-52)."""
    branch = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        branch.weight.fill_(2.0**-60)
    assert lipschitz_upper_bound(Residual(branch)) > 1.0


def test_a_model_holding_a_residual_can_be_scripted():
    """The shape check read ``torch.fx.Proxy``, which TorchScript cannot compile."""
    model = nn.Sequential(Residual(nn.Linear(4, 4)), nn.ReLU())
    x = torch.randn(3, 4)
    assert torch.equal(torch.jit.script(model)(x), model(x))
