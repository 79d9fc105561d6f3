import pytest
import torch
from torch.func import functional_call

from lipcert import nn as lnn
from lipcert.nn.constraint import EvalCache


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
