"""The thirteenth review's findings on the flat-Sequential graph, the batched trace check, the
scaled conv symbol, the whole-map ScaledAvgPool2d and the patched-method check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipcert
from lipcert.bounds.graph import _LeafTracer, graph_bound, trace
from lipcert.bounds.network import register_bound_rule
from lipcert.bounds.padded_conv import conv_operator_norm, module_geometry
from lipcert.nn.pooling import ScaledAvgPool2d


class _OneAtATime(nn.Module):
    """A linear layer that asserts a batch of one (torch._assert is traced, and raises
    AssertionError on the three samples of the batched trace check)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        torch._assert(x.shape[0] == 1, "one sample at a time")
        return self.fc(x)


def test_a_model_that_asserts_a_batch_of_one_is_still_bounded():
    """The batched check let AssertionError out (a traceback where the one-scale check bounded
    the model): any failure of the batch now falls back to one scale at a time."""
    torch.manual_seed(0)
    model = _OneAtATime()
    exact = float(torch.linalg.matrix_norm(model.fc.weight.double(), ord=2))
    assert lipcert.lipschitz_upper_bound(model, (4,)) >= exact


class _Doubled(nn.Module):
    """Twice its inner module (a bound rule of 2 is registered below: kept whole)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


register_bound_rule(_Doubled)(lambda module, norm: 2.0)


def _traced_nodes(root: nn.Module) -> list[tuple[str, str, object]]:
    graph = _LeafTracer("l2").trace(root)
    return [(n.op, n.name, n.target) for n in graph.nodes]


def test_a_flat_sequential_is_named_as_tracing_names_it():
    """A module also held inside an earlier entry is called by that inner path when traced;
    the graph built without the tracer called it by its own entry's name."""
    lin = nn.Linear(4, 4)
    roots = [
        nn.Sequential(_Doubled(lin), lin),
        nn.Sequential(lin, _Doubled(lin), lin),
        nn.Sequential(lin, nn.ReLU(), lin),
    ]
    for root in roots:
        built = [(n.op, n.name, n.target) for n in trace(root).graph.nodes]
        assert built == _traced_nodes(root)
    names = [node.name for node in graph_bound(roots[0], (4,)).nodes]
    assert names == ["0", "0.inner"]


def test_a_whole_map_pool_in_float16_does_not_overflow():
    """The float16 sum of 256 pixels of 300 overflowed to inf; the pooled value is 4800."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.full((1, 2, 16, 16), 300.0, dtype=dtype)
        for pool in (ScaledAvgPool2d(None), ScaledAvgPool2d(16)):
            out = pool(x)
            assert out.dtype == dtype
            assert out.flatten().tolist() == [4800.0, 4800.0]


def test_an_empty_feature_map_is_refused():
    """A global window over 0 pixels gave NaN (0 / 0) instead of an error naming the layer."""
    for pool in (ScaledAvgPool2d(None), ScaledAvgPool2d(2)):
        with pytest.raises(ValueError, match="empty feature map"):
            pool(torch.ones(1, 2, 0, 4))


class _Hundredfold(torch.Tensor):
    def __call__(self, x):
        return 100 * x


@pytest.mark.parametrize("kind", ["module", "tensor"])
def test_a_callable_in_the_instance_dict_shadowing_forward_is_refused(kind):
    """A module (or callable tensor) put in a Linear's __dict__ as ``forward`` is what a call
    runs; it was trusted (bound 0.69 of the 1x Linear, exact norm 94 of the 100x one)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    if kind == "module":
        patch = nn.Linear(4, 4)
        with torch.no_grad():
            patch.weight.mul_(100)
    else:
        patch = torch.zeros(1).as_subclass(_Hundredfold)
    lin.__dict__["forward"] = patch
    x = torch.randn(1, 4)
    assert torch.equal(lin(x), patch(x))
    with pytest.raises(TypeError, match=r"a method patched on the instance \(forward\)"):
        lipcert.lipschitz_upper_bound(nn.Sequential(lin), (4,))


@pytest.mark.parametrize("big", [2.0**1000, 1.0, 2.0**-900])
def test_taps_that_underflow_in_the_scaled_kernel_stay_covered(big):
    """Taps +-big alias on the 2-point torus and cancel; the middle tap (the whole operator on a
    1-pixel input) underflows when the kernel is divided by big: still bounded."""
    conv = nn.Conv1d(1, 1, 3, padding=1, bias=False).double()
    tiny = max(big * 2.0**-1100, 2.0**-1074)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[big, tiny, -big]]], dtype=torch.float64))
    bound = conv_operator_norm(conv.weight, module_geometry(conv, (1,)))
    assert bound >= tiny
    assert math.isfinite(bound)
