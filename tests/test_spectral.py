"""SpectralLinear / SpectralConv2d: sound (exact Jacobians), exportable, state and eval cache.

The ``check_*`` helpers are shared with tests/test_orthogonal.py and tests/test_head.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps, max_jacobian_norm
from torch import nn
from torch.nn.utils import parametrize

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.export import export
from lipcert.nn.constraint import original
from lipcert.nn.spectral import SpectralConv2d, SpectralLinear

#: Largest allowed gap between a lipcert layer's output and its export's (house rule).
EXPORT_TOL = 1e-5
#: Relative error of the float64 SVD that measures the "exact" Jacobian norm (a few ulps).
SVD_TOL = 1e-12
#: Scale applied to the raw weights before testing: the constraint must not depend on it.
LARGE_WEIGHT = 1e3

LayerFactory = Callable[..., nn.Module]


def scale_raw_weight(layer: nn.Module, factor: float = LARGE_WEIGHT) -> nn.Module:
    with torch.no_grad():
        original(layer).mul_(factor)
    return layer


def check_sound(layer: nn.Module, input_shape: tuple[int, ...], limit: float | None = 1.0) -> None:
    """Exact float64 Jacobian norm <= ``limit`` (+ tol) and <= lipschitz_bound(), train and eval.

    Eval mode runs with frozen parameters so that the forward goes through the eval cache.
    """
    layer = layer.double()
    for training in (True, False):
        layer.train(training).requires_grad_(training)
        exact = max_jacobian_norm(layer, input_shape)
        if limit is not None:
            assert exact <= limit + LIPSCHITZ_TOL
        assert exact <= layer.lipschitz_bound() * (1 + SVD_TOL)
    layer.train().requires_grad_(True)


def check_sound_before_and_after_adversarial_steps(
    layer: nn.Module, input_shape: tuple[int, ...], limit: float | None = 1.0
) -> None:
    layer = scale_raw_weight(layer.double())
    check_sound(layer, input_shape, limit)
    adversarial_steps(layer, input_shape)
    check_sound(layer, input_shape, limit)


def check_float32_weight_is_covered(layer: nn.Module, input_shape: tuple[int, ...],
                                    limit: float | None = 1.0) -> None:  # fmt: skip
    """The float32 weight the eval forward uses: exact float64 norm <= limit and <= the bound."""
    adversarial_steps(scale_raw_weight(layer), input_shape)
    layer.eval()
    exact = max_jacobian_norm(layer.export().double(), input_shape)
    if limit is not None:
        assert exact <= limit + LIPSCHITZ_TOL
    assert exact <= layer.lipschitz_bound() * (1 + SVD_TOL)


def check_export(layer: nn.Module, input_shape: tuple[int, ...], plain_type: type) -> None:
    layer.eval()
    plain = layer.export()
    assert type(plain) is plain_type and not parametrize.is_parametrized(plain)
    x = torch.randn((5, *input_shape), dtype=original(layer).dtype)
    with torch.no_grad():
        assert (plain(x) - layer(x)).abs().max() <= EXPORT_TOL


def check_state_dict_round_trip(make: LayerFactory, input_shape: tuple[int, ...]) -> None:
    source, target = make(seed=0).eval(), make(seed=1).eval()
    assert set(source.state_dict()) == {"parametrizations.weight.original", "bias"}
    target.load_state_dict(source.state_dict())
    x = torch.randn((2, *input_shape))
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert target.lipschitz_bound() == source.lipschitz_bound()


def check_eval_cache_follows_updates(make: LayerFactory, input_shape: tuple[int, ...]) -> None:
    """The cached constrained weight is reused, then refreshed by load_state_dict and SGD."""
    layer, other = make(seed=0).eval(), make(seed=1).eval()
    x = torch.randn((2, *input_shape))
    with torch.no_grad():
        assert layer.weight is layer.weight  # computed once, then cached
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).square().sum().backward()
    opt.step()
    reference = make(seed=2).train()  # train mode never reads the cache
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        after = layer(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, reference(x), rtol=0, atol=0)
    assert layer.lipschitz_bound() == reference.lipschitz_bound()


def check_train_mode_backpropagates(layer: nn.Module, input_shape: tuple[int, ...]) -> None:
    layer.train()
    assert layer.weight is not layer.weight  # recomputed at every access
    layer(torch.randn((3, *input_shape), dtype=original(layer).dtype)).square().sum().backward()
    grad = original(layer).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SpectralLinear

features = st.integers(1, 6)


def _linear(in_features=4, out_features=3, seed=0, dtype=torch.float32) -> SpectralLinear:
    torch.manual_seed(seed)
    return SpectralLinear(in_features, out_features, dtype=dtype)


@given(features, features, st.booleans())
def test_linear_is_one_lipschitz_at_init_and_after_adversarial_steps(n_in, n_out, bias):
    layer = SpectralLinear(n_in, n_out, bias=bias)
    check_sound_before_and_after_adversarial_steps(layer, (n_in,))


@given(features, features)
def test_linear_float32_weight_is_covered_by_its_bound(n_in, n_out):
    check_float32_weight_is_covered(_linear(n_in, n_out), (n_in,))


def test_linear_has_norm_one_up_to_the_gram_slack():
    layer = _linear(64, 32).eval()
    with torch.no_grad():
        norm = torch.linalg.matrix_norm(layer.weight.double(), ord=2)
    assert 1 - 1e-3 <= norm <= 1 + LIPSCHITZ_TOL


def test_linear_export_state_cache_and_training():
    check_export(_linear(), (4,), nn.Linear)
    check_state_dict_round_trip(_linear, (4,))
    check_eval_cache_follows_updates(_linear, (4,))
    check_train_mode_backpropagates(_linear(), (4,))


def test_linear_matches_deel_torchlip_spectral_normalization():
    """Same convention as deel-torchlip's SpectralLinear without Björck (W / sigma_1): equal
    weights up to the estimates, but theirs divides by a power-iteration *lower* estimate."""
    torchlip = pytest.importorskip("deel.torchlip")
    ours = _linear(16, 8, dtype=torch.float64).eval()
    peer = torchlip.SpectralLinear(16, 8, eps_bjorck=None).double()
    with torch.no_grad():
        peer.parametrizations.weight.original.copy_(original(ours))
        peer.bias.copy_(ours.bias)
        for _ in range(200):  # one power iteration per training forward
            peer.train()(torch.zeros(1, 16, dtype=torch.float64))
        peer.eval()
        theirs, mine = peer.weight, ours.weight
    torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=0)
    assert torch.linalg.matrix_norm(mine, ord=2) <= 1 + LIPSCHITZ_TOL


# --------------------------------------------------------------------------------------------
# SpectralConv2d


@st.composite
def conv_cases(draw):
    """(layer kwargs, input shape): stride 1-2, zero padding 0..k or circular <= (k-1)/2."""
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kernel = draw(st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 3])))
    stride = draw(st.sampled_from([1, 2, (2, 1)]))
    mode = draw(st.sampled_from(["zeros", "circular"]))
    most = [k if mode == "zeros" else (k - 1) // 2 for k in kernel]
    padding = tuple(draw(st.integers(0, m)) for m in most)
    if stride == 1 and draw(st.booleans()):
        padding = "same"
    size = (draw(st.integers(4, 7)), draw(st.integers(4, 7)))
    kwargs = {"in_channels": c_in, "out_channels": c_out, "kernel_size": kernel,
              "stride": stride, "padding": padding, "padding_mode": mode}  # fmt: skip
    return kwargs, (c_in, *size)


def _conv(seed=0, dtype=torch.float32, **kwargs) -> SpectralConv2d:
    torch.manual_seed(seed)
    args = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, **kwargs}
    return SpectralConv2d(**args, dtype=dtype)


@given(conv_cases())
def test_conv_is_one_lipschitz_at_init_and_after_adversarial_steps(case):
    kwargs, input_shape = case
    check_sound_before_and_after_adversarial_steps(_conv(**kwargs), input_shape)


@given(conv_cases())
def test_conv_float32_weight_is_covered_by_its_bound(case):
    kwargs, input_shape = case
    check_float32_weight_is_covered(_conv(**kwargs), input_shape)


def test_conv_is_close_to_norm_one_on_large_inputs():
    """Normalised by a bound within 2% of the symbol's supremum: ~0.97 on a 16 x 16 input."""
    layer = _conv(in_channels=4, out_channels=4, dtype=torch.float64).eval()
    assert max_jacobian_norm(layer, (4, 16, 16), n_points=1) >= 0.96


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2, "padding": 1}, {"padding_mode": "circular"}, {"kernel_size": (1, 3)}],
)
def test_conv_export_state_cache_and_training(kwargs):
    def make(seed=0):
        return _conv(seed=seed, **kwargs)

    check_export(make(), (3, 6, 7), nn.Conv2d)
    check_state_dict_round_trip(make, (3, 6, 7))
    check_eval_cache_follows_updates(make, (3, 6, 7))
    check_train_mode_backpropagates(make(), (3, 6, 7))


def test_conv_onnx_export_runs_with_equal_outputs(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(_conv(stride=2, padding=1), nn.ReLU(), _conv(in_channels=4))
    path = tmp_path / "spectral.onnx"
    export(model, onnx_path=path, input_shape=(3, 8, 8))
    x = torch.randn((2, 3, 8, 8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - model.eval()(x)).abs().max() <= EXPORT_TOL


def test_network_bound_uses_the_layer_bounds():
    model = nn.Sequential(_conv(), nn.ReLU(), nn.Flatten(), _linear(4 * 5 * 5, 3))
    bound = lipschitz_upper_bound(model, (3, 5, 5))
    product = model[0].lipschitz_bound() * model[3].lipschitz_bound()
    assert product <= bound <= math.nextafter(product, math.inf)  # the product rounded up
    assert bound <= 1 + 1e-5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": -1}, "out_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (3,)}, "kernel_size"),
        ({"stride": 0}, "stride"),
        ({"stride": 2}, "padding"),  # padding="same" needs stride 1
        ({"padding_mode": "reflect"}, "padding_mode"),
        ({"padding": 2, "padding_mode": "circular"}, "padding"),  # wraps twice
    ],
)
def test_bad_conv_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _conv(**kwargs)


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (SpectralLinear(4, 3), (2, 5), "(*, 4)"),
        (SpectralConv2d(3, 4, 3), (2, 4, 6, 6), "(B, 3, H, W)"),
        (SpectralConv2d(3, 4, 3), (2, 3, 6), "(B, 3, H, W)"),
    ],
)
def test_wrong_input_shape_names_the_layer_and_both_shapes(layer, shape, expected):
    with pytest.raises(ValueError, match=type(layer).__name__.removeprefix("Parametrized")) as e:
        layer(torch.zeros(shape))
    assert expected in str(e.value) and str(shape) in str(e.value)


@pytest.mark.parametrize("scale", [1e-36, 1e20, 1e30])
def test_weights_of_extreme_magnitude_stay_normalized(scale):
    """The Gram bound's Frobenius norms under- or overflowed at these scales: SpectralLinear came
    out at norm 1 + 1.2e-6 for 1e-36, SpectralConv2d at norm 0 (an infinite bound) for 1e20."""
    torch.manual_seed(0)
    linear, conv = SpectralLinear(16, 16).eval(), SpectralConv2d(4, 4, 3).eval()
    with torch.no_grad():
        original(linear).copy_(torch.randn(16, 16) * scale)
        original(conv).copy_(torch.randn(4, 4, 3, 3) * scale)
        weight = linear.weight.double()
        kernel = conv.weight.double()
    assert torch.linalg.matrix_norm(weight, ord=2) <= 1 + LIPSCHITZ_TOL
    jacobian = torch.func.jacrev(lambda x: torch.nn.functional.conv2d(x, kernel, padding=1))(
        torch.zeros(1, 4, 6, 6, dtype=torch.float64)
    ).reshape(144, 144)
    assert 0.5 < torch.linalg.matrix_norm(jacobian, ord=2) <= 1 + LIPSCHITZ_TOL


def test_a_stride_changed_after_construction_is_refused_by_the_bound():
    """A strided bound covers only that stride (a strided convolution can have a smaller norm):
    stride 2 set back to 1 on a built layer, or circular padding, is refused by name."""
    layer = SpectralConv2d(3, 4, 3, stride=2, padding=1)
    assert lipschitz_upper_bound(layer) <= 1 + LIPSCHITZ_TOL
    for name, value in [("stride", (1, 1)), ("padding_mode", "circular")]:
        changed = SpectralConv2d(3, 4, 3, stride=2, padding=1)
        setattr(changed, name, value)
        with pytest.raises(ValueError, match="assumes stride"):
            lipschitz_upper_bound(changed)
