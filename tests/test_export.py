"""lipcert.export on models mixing constrained layers with the stateless layers; ONNX round trip."""

from __future__ import annotations

import math

import pytest
import torch
from lipschitz import jacobian_spectral_norm
from torch import Tensor, nn
from torch.nn.utils import parametrize

import lipcert
from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.bounds.operator import gram_spectral_bound
from lipcert.nn.activations import GroupSort, MaxMin, get_activation
from lipcert.nn.constrained import BoundedWeightConstraint, ConstrainedConv2d, ConstrainedLinear
from lipcert.nn.pooling import InvertibleDownsample, L2NormPool2d, ScaledAvgPool2d

#: lipcert modules allowed in an exported model: stateless, no parameters or buffers.
STATELESS_LAYERS = (GroupSort, ScaledAvgPool2d, L2NormPool2d)
#: Largest difference allowed between a model and its export (house rule).
EXPORT_TOL = 1e-5


def _im2col_bound(weight: Tensor) -> Tensor:
    """Sound l2 bound of a stride-1 conv (or linear) layer: conv = reshaped kernel o im2col, where
    im2col repeats every pixel at most kh*kw times, so ||conv|| <= sqrt(kh kw) ||W (out, -1)||."""
    kernel_area = weight[0, 0].numel()  # kh * kw; 1 for a linear layer
    return gram_spectral_bound(weight.reshape(weight.shape[0], -1)) * math.sqrt(kernel_area)


class Im2colNormalized(BoundedWeightConstraint):
    """Divides the weight by :func:`_im2col_bound`: a tiny test constraint."""

    def constrain(self, weight: Tensor) -> Tensor:
        return weight / _im2col_bound(weight)

    def operator_bound(self, layer: nn.Module, weight: Tensor) -> float:
        return float(_im2col_bound(weight))


def _conv(in_channels: int, out_channels: int) -> ConstrainedConv2d:
    return ConstrainedConv2d(in_channels, out_channels, 3, constraint=Im2colNormalized())


def _linear(in_features: int, out_features: int) -> ConstrainedLinear:
    return ConstrainedLinear(in_features, out_features, constraint=Im2colNormalized())


def _downsampling_net() -> nn.Sequential:
    return nn.Sequential(
        _conv(3, 8),
        MaxMin(),
        _conv(8, 8),
        GroupSort(4),
        InvertibleDownsample(2),
        _conv(32, 8),
        GroupSort(2),
        L2NormPool2d(None),
        nn.Flatten(),
        _linear(8, 4),
    )


def _pooling_net() -> nn.Sequential:
    return nn.Sequential(
        _conv(3, 6),
        nn.ReLU(),
        ScaledAvgPool2d(2),
        _conv(6, 6),
        GroupSort(3),
        L2NormPool2d((1, 2)),
        nn.Flatten(),
        _linear(6 * 3 * 1, 3),
    )


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        _linear(3 * 6 * 4, 16),
        MaxMin(),
        _linear(16, 16),
        GroupSort(8),
        get_activation("relu"),
        _linear(16, 3),
    )


#: (name, builder, input shape without batch); inputs are tiny on purpose (2 shared CPU cores).
MODELS = [
    ("downsampling", _downsampling_net, (3, 6, 8)),
    ("pooling", _pooling_net, (3, 6, 4)),
    ("mlp", _mlp, (3, 6, 4)),
]
MODEL_IDS = [name for name, _, _ in MODELS]


def _build(builder) -> nn.Module:
    torch.manual_seed(0)
    return builder()


def _batch(input_shape: tuple[int, ...], batch: int = 5) -> Tensor:
    return torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize(("name", "builder", "input_shape"), MODELS, ids=MODEL_IDS)
def test_export_is_plain_and_equal(name, builder, input_shape) -> None:
    model = _build(builder)
    plain = lipcert.export(model)
    for module in plain.modules():
        assert not parametrize.is_parametrized(module)
        if isinstance(module, STATELESS_LAYERS):
            assert not list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        else:
            assert type(module).__module__.startswith("torch.nn."), type(module)
    assert not plain.training
    x = _batch(input_shape)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x), rtol=0, atol=EXPORT_TOL)


@pytest.mark.parametrize(("name", "builder", "input_shape"), MODELS, ids=MODEL_IDS)
def test_bound_covers_the_exported_function(name, builder, input_shape) -> None:
    model = _build(builder)
    plain = lipcert.export(model).double().requires_grad_(False)
    x = _batch(input_shape, batch=1)[0].double()
    assert jacobian_spectral_norm(plain, x) <= lipschitz_upper_bound(model, input_shape)


def test_export_computes_what_the_model_computes_after_a_data_write() -> None:
    """A ``.data`` write bumps no version counter: the model keeps its cached constrained weights,
    and the export must fold those, not the new raw values (it used to differ by ~2)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        lipcert.nn.SLLLinear(6, 12), lipcert.nn.AOLLinear(6, 6), lipcert.nn.OrthoLinear(6, 4)
    ).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = model(x)
        for name, parameter in model.named_parameters():
            if not name.endswith("bias"):  # biases are used as they are, never cached
                parameter.data.mul_(-2)
        assert torch.equal(model(x), before)  # the eval caches did not see the writes
        torch.testing.assert_close(lipcert.export(model)(x), before, rtol=0, atol=EXPORT_TOL)


def test_export_leaves_every_module_mode_unchanged() -> None:
    model = _build(_downsampling_net)
    for training in (True, False):
        model.train(training)
        model[2].train(not training)  # mixed modes must survive too
        modes = [module.training for module in model.modules()]
        lipcert.export(model)
        assert [module.training for module in model.modules()] == modes


def test_export_leaves_the_original_untouched_and_trainable() -> None:
    model = _build(_pooling_net).train()
    input_shape = (3, 6, 4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    plain = lipcert.export(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for layer in (model[0], model[3], model[7]):
        assert parametrize.is_parametrized(layer, "weight")
    assert all(param.requires_grad for param in model.parameters())

    x = _batch(input_shape)
    with torch.no_grad():
        plain_before = plain(x).clone()
        model_before = model.eval()(x).clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(x).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), model_before)  # the step reached the model
        torch.testing.assert_close(plain(x), plain_before, rtol=0, atol=0)  # not the export


@pytest.mark.parametrize(("name", "builder", "input_shape"), MODELS, ids=MODEL_IDS)
def test_onnx_runs_with_equal_outputs_for_any_batch(tmp_path, name, builder, input_shape) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _build(builder)
    path = tmp_path / f"{name}.onnx"
    lipcert.export(model, onnx_path=path, input_shape=input_shape)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = _batch(input_shape, batch)
        (out,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model.eval()(x)
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=EXPORT_TOL)
