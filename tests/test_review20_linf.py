"""Review of the twentieth session: l_inf-distance nets under unusual weights and calls.

A bias that cancels the distances hid them from the rounding allowance (a certified radius broken
at a tenth of it); an ONNX file of a float64 net took float32 inputs; an empty training batch set
the running mean to NaN; finite-p distances of subnormal differences were NaN; the exported layer
and a p loaded from a state dict failed or were bounded without naming the problem.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipcert
from lipcert.bounds.graph import graph_bound
from lipcert.bounds.network import module_bound
from lipcert.nn.linf import LinfDist, Negate
from lipcert.nn.linf_kernel import lp_distance


def _bias_cancelling(p: float) -> nn.Module:
    """Logits (x, 0.45 - |x|) for x in [0, 1] in exact arithmetic; the first is computed as
    |x - 1e6| - 1e6, whose float32 subtraction rounds to multiples of 2^-4."""
    layer = LinfDist(1, 2, p=p)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e6], [0.0]]))
        layer.bias.copy_(torch.tensor([-1e6, -0.45]))
    return nn.Sequential(layer, Negate()).eval()


@pytest.mark.parametrize("p", [math.inf, 8.0])
@pytest.mark.parametrize("exported", [False, True])
def test_distances_that_the_bias_cancels_are_allowed_for(p, exported):
    """The internal size of a LinfDist was its output plus bias: distances ~1e6 that a bias of
    -1e6 cancels counted as ~0, and x = 0.2190 (exact margin -0.012, computed +0.019) was
    certified to 0.00915 while x = 0.2185, 5e-4 away, is classified 1."""
    model = _bias_cancelling(p)
    model = lipcert.export(model) if exported else model
    assert graph_bound(model, (1,), "linf").zero_input_scale >= 1e6
    x, near = torch.tensor([[0.2190]]), torch.tensor([[0.2185]])
    assert int(model(near).argmax()) == 1
    radius = lipcert.certify(model, x, torch.tensor([0]), norm="linf")
    assert float(radius) < float((x - near).abs())


def test_onnx_of_a_float64_linf_net_takes_float64_inputs(tmp_path):
    """write_onnx took the example input's dtype from the parameters, and an exported pure
    l_inf-distance net has none (PlainLinfDist holds buffers): its ONNX input was float32, which
    refused float64 inputs and rounded them."""
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(LinfDist(6, 8, bias=False, mean_shift=True), LinfDist(8, 3), Negate())
    model = model.double().train()
    model(torch.rand(16, 6, dtype=torch.float64))
    model.eval()
    lipcert.export(model, onnx_path=tmp_path / "linf.onnx", input_shape=(6,))
    session = onnxruntime.InferenceSession(str(tmp_path / "linf.onnx"))
    assert session.get_inputs()[0].type == "tensor(double)"
    x = torch.rand(5, 6, dtype=torch.float64) + 1e-9
    (out,) = session.run(None, {"input": x.numpy()})
    assert (torch.from_numpy(out) - model(x).detach()).abs().max() <= 1e-12


def test_an_empty_training_batch_keeps_the_running_mean():
    """The mean of zero rows is NaN: one empty batch in training made the running mean NaN for
    good (every later eval output NaN). BatchNorm1d leaves its statistics unchanged."""
    layer = LinfDist(4, 3, bias=False, mean_shift=True).train()
    layer(torch.randn(8, 4))
    before = layer.running_mean.clone()
    assert layer(torch.randn(0, 4)).shape == (0, 3)
    assert torch.equal(layer.running_mean, before)


@pytest.mark.parametrize("p", [8.0, 7.3, 2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_p_distances_of_subnormal_differences(p, dtype):
    """max |d| below the smallest normal float has no float reciprocal (1 / 1e-40 overflows
    float32): the scaled terms were inf * 0 = NaN, value and gradients."""
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([[tiny / 2**10, 0.0, tiny / 2**12]], dtype=dtype, requires_grad=True)
    w = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    out = lp_distance(x, w, p)
    exact = torch.linalg.vector_norm(x.detach().double() * 2.0**200, ord=p) / 2.0**200
    assert torch.isfinite(out).all()
    assert float((out.double() - exact).abs().max()) <= 3 * tiny
    grads = torch.autograd.grad(out.sum(), (x, w))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_exported_layer_refuses_a_wrong_input_size_by_name():
    """PlainLinfDist reshaped any input to rows of in_features: (2, 8) failed deep in a reshape
    ("shape '[2, 3]' is invalid for input of size 12") where LinfDist names the sizes."""
    plain = LinfDist(4, 3).export()
    for shape in ((2, 8), (2, 5), (3, 2, 2)):
        with pytest.raises(ValueError, match=r"PlainLinfDist expects input \(\*, 4\), got"):
            plain(torch.randn(shape))


@pytest.mark.parametrize("p", [0.5, -1.0, math.nan, -math.inf])
def test_a_p_below_one_from_a_state_dict_is_refused_by_name(p):
    """p is a buffer: a tampered checkpoint (or a write through .data) sets it unchecked, and
    lipschitz_bound() then returned N^(1/p) for a map that is no norm (36 at p = 0.5, 1/6 at
    p = -1, NaN), while the forward failed without naming the layer."""
    layer = LinfDist(6, 3)
    state = layer.state_dict()
    state["p"] = torch.tensor(p, dtype=torch.float64)
    layer.load_state_dict(state)
    for call in (layer.lipschitz_bound, lambda: module_bound(nn.Sequential(layer), "linf")):
        with pytest.raises(ValueError, match=r"LinfDist: p must be a number >= 1"):
            call()
    with pytest.raises(ValueError, match=r"LinfDist: p must be a number >= 1"):
        layer(torch.randn(2, 6))
