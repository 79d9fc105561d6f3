import pytest
import torch
from lipschitz import max_jacobian_norm
from torch.func import functional_call
from torch.nn.utils import parametrize

from lipcert import nn as lnn
from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.nn.constraint import EvalCache, original


@pytest.mark.parametrize("layer_class", [lnn.SpectralLinear, lnn.AOLLinear, lnn.OrthoLinear])
def test_eval_cache_is_not_fooled_by_a_reused_address(layer_class):
    """functional_call with a fresh weight each call: a freed weight's id, address and version can
    come back on the next one; the cached constrained weight must still be the new weight's."""
    torch.manual_seed(0)
    layer = layer_class(32, 32, bias=False).eval()
    constraint = layer.parametrizations.weight[0]
    x = torch.randn(4, 32)
    with torch.no_grad():
        for _ in range(50):
            weight = torch.randn(32, 32)
            out = functional_call(layer, {"parametrizations.weight.original": weight}, (x,))
            torch.testing.assert_close(out, x @ constraint.constrain(weight).T)
            del weight, out


def test_eval_cache_recomputes_after_in_place_changes_and_replacements():
    cache, calls = EvalCache(), []
    source = torch.ones(3)

    def compute():
        calls.append(1)
        return source.sum()

    for _ in range(2):
        cache.get([source], compute, enabled=True)
    source.add_(1)  # bumps the version counter
    assert cache.get([source], compute, enabled=True) == 6 and len(calls) == 2
    source = torch.ones(3)  # a new tensor
    assert cache.get([source], compute, enabled=True) == 3 and len(calls) == 3


def test_the_eval_cache_follows_the_constraint_settings():
    """AOL's rescale side changed in eval mode: the cache, keyed on the raw weight only, kept the
    old weight under no_grad while a forward with gradients used the new one."""
    torch.manual_seed(1)
    layer = lnn.AOLLinear(3, 2, bias=False).eval()
    x = torch.tensor([[1.0, 1.0, 0.0]])
    with torch.no_grad():
        layer(x)  # fills the cache
    layer.constraint.rescale = "output"
    with torch.no_grad():
        cached = layer(x)
    assert torch.equal(cached, layer(x).detach())


def test_certify_recomputes_the_eval_caches_when_the_model_changed():
    """A write through .data, certify, then clear_caches: certify reused the bound of the stale
    cached head (radius 99.9) for the new one (true radius 0.4995, broken at 0.6)."""
    import lipcert

    head = lnn.RowNormLinear(2, 2, bias=False)
    with torch.no_grad():
        original(head).copy_(torch.tensor([[1.0, 0.0], [1.0, 0.01]]))
    model = torch.nn.Sequential(head).eval()
    x, y = torch.tensor([[1.0, 0.5]]), torch.tensor([0])
    lipcert.certify(model, x, y)
    original(head).data.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    with torch.no_grad():
        fresh = head.weight.detach().clone()
    first = lipcert.certify(model, x, y)
    lnn.clear_caches(model)
    second = lipcert.certify(model, x, y)
    true_radius = (model(x)[0, 0] - model(x)[0, 1]) / (fresh[0] - fresh[1]).norm()
    assert torch.equal(first, second)
    assert float(second[0]) <= float(true_radius)


@pytest.mark.parametrize(
    "build",
    [
        lambda: lnn.SpectralConv2d(8, 8, 3),
        lambda: lnn.OrthoLinear(16, 16),
        lambda: lnn.AOLConv2d(4, 6, 3),
        lambda: lnn.RowNormLinear(8, 4),
        lambda: lnn.SpectralLinear(8, 4),
    ],
)
def test_building_a_layer_does_not_evaluate_its_constraint(build, monkeypatch):
    """Registration used to run the constraint once on the raw init as a shape check: the sound
    conv bound of SpectralConv2d(256, 128, 3) took 2.9 s, 11.5 s at 5 x 5. The first forward
    computes it; shape and dtype are kept by every constraint (checked here)."""
    from lipcert.nn.constraint import WeightConstraint

    calls = []
    forward = WeightConstraint.forward
    monkeypatch.setattr(
        WeightConstraint, "forward", lambda self, w: calls.append(1) or forward(self, w)
    )
    layer = build()
    assert calls == []
    weight = layer.weight
    assert calls and weight.shape == original(layer).shape and weight.dtype == original(layer).dtype


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("layer_class", [lnn.AOLLinear, lnn.SLLLinear])
def test_eval_cache_sees_a_fused_optimizer_step(optimizer, layer_class):
    """A fused step bumps no version counter: the eval forward after it kept the constrained
    weights of the pre-step values (off by 0.8 to 4.3), which the bound and export also read."""
    torch.manual_seed(0)
    layer, x = layer_class(6, 5).eval(), torch.randn(4, 6)
    with torch.no_grad():
        layer(x)  # fills the cache
    step = optimizer(layer.parameters(), lr=0.5, fused=True)
    layer.train()(x).square().sum().backward()
    step.step()
    fresh = layer_class(6, 5)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), fresh.eval()(x))
    assert layer.lipschitz_bound() == fresh.lipschitz_bound()


def test_a_fused_step_bumps_the_version_once_like_an_unfused_one():
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    versions = []
    for kwargs in ({"foreach": False}, {"fused": True}):
        before = weight._version
        torch.optim.SGD([weight], lr=0.1, **kwargs).step()
        versions.append(weight._version - before)
    assert versions == [1, 1]


@pytest.mark.parametrize("layer_class", [lnn.AOLLinear, lnn.SpectralLinear, lnn.SLLLinear])
def test_eval_cache_sees_weights_given_new_data(layer_class):
    """``param.data = ...`` bumps no version. A transposed view of a square weight kept its address
    and shape (stale outputs off by 2.0); ``.half()`` then ``.double()`` freed the old storage
    and the new one could come back at its address (11 of 55 round trips in one run), the layer
    then computing with the weights constrained before the rounding."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)

    def fresh_output(layer):
        fresh = layer_class(5, 5).double().eval()
        fresh.load_state_dict(layer.state_dict())
        return fresh(x)

    with torch.no_grad():
        for _ in range(20):
            layer = layer_class(5, 5).double().eval()
            layer(x)  # fills the cache
            layer.half().double()
            torch.testing.assert_close(layer(x), fresh_output(layer), rtol=0, atol=1e-12)
        raw = original(layer)
        raw.data = raw.data.t()
        torch.testing.assert_close(layer(x), fresh_output(layer), rtol=0, atol=1e-12)


@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_a_layer_whose_constraint_was_removed_is_refused_by_name(leave_parametrized):
    """After ``remove_parametrizations`` the forward uses a plain weight (the raw one, norm 5.0
    here, with ``leave_parametrized=False``); the bound raised "no attribute 'constraint'"."""
    torch.manual_seed(0)
    layer = lnn.AOLConv2d(3, 4, 3).double()
    with torch.no_grad():
        original(layer).mul_(5)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=leave_parametrized)
    with pytest.raises(ValueError, match="AOLConv2d has no weight constraint"):
        lipschitz_upper_bound(torch.nn.Sequential(layer), (3, 5, 5))
    plain = layer.export()
    assert lipschitz_upper_bound(plain, (3, 5, 5)) >= max_jacobian_norm(plain, (3, 5, 5))


def _constrained_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        lnn.AOLConv2d(3, 8, 3),
        torch.nn.ReLU(),
        lnn.SLLConv2d(8, 8, 3),
        lnn.CayleyConv2d(8, 4, 3, 6),
        lnn.AOLConv2d(4, 4, 3, rescale="auto"),
        torch.nn.Flatten(),
        lnn.SpectralLinear(4 * 6 * 6, 5),
        lnn.OrthoLinear(5, 5),
        lnn.SLLLinear(5, 7),
    )


def _count_computations(net: torch.nn.Module) -> list[int]:
    """Count every constrained value the layers of ``net`` compute: parametrizations, SLL's
    folds, Cayley spectra."""
    calls: list[int] = []
    for module in net.modules():
        if parametrize.is_parametrized(module):
            module.parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
        for name in ("_fold_all", "_fresh_unitary"):
            method = getattr(module, name, None)
            if method is not None:
                setattr(module, name, lambda method=method: calls.append(1) or method())
    return calls


def test_precomputed_weights_change_when_the_weights_are_computed_not_their_bits():
    """The outputs and every parameter's gradient with the weights computed before the forward
    equal those computed layer by layer, bit for bit, each weight (parametrized, SLL's folds,
    Cayley's spectrum) computed once, before the forward."""
    torch.manual_seed(0)
    net = _constrained_net().train()
    x = torch.randn(4, 3, 6, 6)
    out = net(x)
    out.square().sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    calls = _count_computations(net)
    net(x)
    layers = len(calls)
    assert layers == 7
    calls.clear()
    with lnn.precomputed_weights(net):
        assert len(calls) == layers  # before the forward
        again = net(x)
    again.square().sum().backward()
    assert len(calls) == layers  # the forward reused them
    assert torch.equal(again, out)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), expected, strict=True))


def test_values_held_for_a_forward_follow_grad_mode_and_tensors():
    """Inside the block a value is handed back only to the grad mode it was computed in (one
    computed without gradients would cut the backward) and for the same tensors (a
    functional_call with other parameters computes its own)."""
    torch.manual_seed(0)
    layer = lnn.SLLLinear(4, 6).train()
    x = torch.randn(3, 4)
    with torch.no_grad(), lnn.precomputed_weights(layer), torch.enable_grad():  # no graph held
        layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.log_q.grad is not None
    with lnn.precomputed_weights(layer):
        params = {name: p.detach() * 2 for name, p in layer.named_parameters()}
        doubled = functional_call(layer, params, (x,))
    plain = functional_call(layer, params, (x,))
    assert torch.equal(doubled, plain)


def test_precomputed_weights_leave_plain_models_and_later_steps_alone():
    """A model without parametrizations runs as it is; after the block every weight is computed
    afresh again, so the next step sees the optimizer's update."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    with lnn.precomputed_weights(plain):
        plain(torch.randn(1, 3)).sum().backward()
    assert plain.weight.grad is not None
    net = _constrained_net().train()
    x = torch.randn(2, 3, 6, 6)
    with lnn.precomputed_weights(net):
        net(x).sum().backward()
    before = net[0].weight.detach().clone()
    torch.optim.SGD(net.parameters(), lr=1.0).step()
    assert not torch.equal(net[0].weight, before)
