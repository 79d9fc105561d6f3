"""CayleyConv2d: exact orthogonality, sound bound, export (torch + ONNX), state and eval cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.bounds.operator import semi_unitary_spectral_bound
from lipcert.export import export
from lipcert.nn.cayley import CayleyConv2d, cayley

#: Largest allowed gap between a lipcert layer's output and its export's (house rule).
EXPORT_TOL = 1e-5
#: How far above 1 the bound of a float32 layer may be: Q is solved in float64 and rounded to
#: float32, so its defect is a few float32 ulps (measured < 1e-7).
FLOAT32_BOUND_SLACK = 1e-5

channels = st.integers(1, 6)
kernel_sizes = st.tuples(st.integers(1, 4), st.integers(1, 4))
grid_sizes = st.tuples(st.integers(4, 7), st.integers(4, 7))


def _layer(c_in, c_out, kernel, grid, dtype=torch.float64, seed=0, bias=True) -> CayleyConv2d:
    torch.manual_seed(seed)
    return CayleyConv2d(c_in, c_out, kernel, grid, bias=bias, dtype=dtype)


def _jacobian_singular_values(layer: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """All singular values of the exact float64 Jacobian at a random point (jacrev + SVD)."""
    x = torch.randn(input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    jac = torch.func.jacrev(lambda v: layer(v.unsqueeze(0)).squeeze(0))(x)
    return torch.linalg.svdvals(jac.reshape(-1, x.numel()))  # (min(out, in),)


def _assert_orthogonal(layer: CayleyConv2d) -> None:
    sv = _jacobian_singular_values(layer, (layer.in_channels, *layer.input_size))
    assert sv.max() <= 1 + LIPSCHITZ_TOL
    assert sv.min() >= 1 - LIPSCHITZ_TOL  # gradient-norm preserving (rows/columns orthonormal)
    assert layer.lipschitz_bound() >= sv.max()


@given(channels, channels, kernel_sizes, grid_sizes, st.booleans())
def test_jacobian_is_orthogonal_at_init_and_after_adversarial_steps(
    c_in, c_out, kernel, grid, training
):
    layer = _layer(c_in, c_out, kernel, grid).train(training)
    _assert_orthogonal(layer)
    adversarial_steps(layer, (c_in, *grid))
    layer.requires_grad_(False)  # eval mode then goes through the cached Q
    _assert_orthogonal(layer)


@pytest.mark.parametrize(
    ("c_in", "c_out", "grid"), [(8, 8, (8, 7)), (8, 8, (7, 6)), (5, 8, (8, 7))]
)
def test_blown_up_kernels_stay_orthogonal(c_in, c_out, grid):
    # Cases where the steps leave ||S|| ~ 1e11 with O(1) directions mixed in: without the
    # MAX_SKEW_NORM cap the float64 solve's defect measured 2e-6 to 8e-6 here.
    layer = _layer(c_in, c_out, 5, grid)
    adversarial_steps(layer, (c_in, *grid))
    assert torch.isfinite(layer.weight).all()
    _assert_orthogonal(layer)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 1000))
def test_cayley_is_semi_unitary_and_matches_the_square_formula(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((3, rows, cols), dtype=torch.complex128, generator=gen)
    q = cayley(v)
    small = min(rows, cols)
    gram = q.mH @ q if rows >= cols else q @ q.mH  # (3, small, small)
    torch.testing.assert_close(gram, torch.eye(small, dtype=q.dtype).expand_as(gram))
    if rows >= cols:  # the paper's form: [(I + A)^-1 (I - A); -2 R (I + A)^-1], A = U - U^H + R^H R
        top, rest = v[:, :cols], v[:, cols:]
        eye = torch.eye(cols, dtype=v.dtype)
        skew = top - top.mH + rest.mH @ rest
        inverse = torch.linalg.inv(eye + skew)
        torch.testing.assert_close(q, torch.cat((inverse @ (eye - skew), -2 * rest @ inverse), 1))


@pytest.mark.parametrize(("rows", "cols"), [(4, 4), (6, 3), (2, 5)])
def test_semi_unitary_bound_is_sound_off_the_manifold(rows, cols):
    gen = torch.Generator().manual_seed(0)
    q = cayley(torch.randn((5, rows, cols), dtype=torch.complex128, generator=gen))
    for scale in (1.0, 1.01, 1.5):
        noise = 1e-3 * torch.randn(q.shape, dtype=q.dtype, generator=gen)
        distorted = scale * q + noise
        exact = torch.linalg.matrix_norm(distorted, ord=2).max()
        assert semi_unitary_spectral_bound(distorted) >= exact
    assert semi_unitary_spectral_bound(q) <= 1 + 1e-9


@given(channels, channels, kernel_sizes, grid_sizes)
def test_bound_covers_the_float32_unitary_and_is_tight(c_in, c_out, kernel, grid):
    layer = _layer(c_in, c_out, kernel, grid, dtype=torch.float32)
    adversarial_steps(layer, (c_in, *grid))
    layer.eval()
    with torch.no_grad():
        q = layer.unitary().to(torch.complex128)  # the exact Q the eval forward uses
    exact = torch.linalg.matrix_norm(q, ord=2).max()
    bound = layer.lipschitz_bound()
    assert exact <= bound <= 1 + FLOAT32_BOUND_SLACK
    assert bound > 1.0  # measured from the weights, never an assumed 1.0
    assert lipschitz_upper_bound(nn.Sequential(layer), (c_in, *grid)) == bound


def _assert_export_matches(layer: CayleyConv2d, batch: int = 5) -> None:
    layer.eval()
    plain = layer.export()
    assert type(plain) is nn.Conv2d
    x = torch.randn((batch, layer.in_channels, *layer.input_size))
    with torch.no_grad():
        assert (plain(x) - layer(x)).abs().max() <= EXPORT_TOL


@given(channels, channels, kernel_sizes, grid_sizes)
def test_export_is_a_circular_conv2d_with_equal_outputs(c_in, c_out, kernel, grid):
    layer = _layer(c_in, c_out, kernel, grid, dtype=torch.float32)
    _assert_export_matches(layer)
    adversarial_steps(layer, (c_in, *grid))
    with torch.no_grad():
        layer.bias.zero_()  # the steps blow the bias up to ~1e9, hiding float32 differences
    _assert_export_matches(layer)


@pytest.mark.parametrize(
    ("c_in", "c_out", "grid"), [(3, 3, (5, 5)), (2, 4, (4, 6)), (4, 2, (7, 4))]
)
def test_onnx_export_runs_with_equal_outputs(tmp_path, c_in, c_out, grid):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(_layer(c_in, c_out, 3, grid, dtype=torch.float32), nn.ReLU())
    path = tmp_path / "cayley.onnx"
    export(model, onnx_path=path, input_shape=(c_in, *grid))
    x = torch.randn((3, c_in, *grid))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - model.eval()(x)).abs().max() <= EXPORT_TOL


def test_state_dict_round_trip():
    source = _layer(3, 4, 3, (5, 6), dtype=torch.float32, seed=0)
    target = _layer(3, 4, 3, (5, 6), dtype=torch.float32, seed=1)
    assert set(source.state_dict()) == {"weight", "bias"}
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)
    assert target.lipschitz_bound() == source.lipschitz_bound()


def test_eval_cache_is_used_and_follows_load_state_dict_and_optimizer_steps():
    layer = _layer(3, 3, 3, (5, 6), dtype=torch.float32).eval()
    other = _layer(3, 3, 3, (5, 6), dtype=torch.float32, seed=1).eval()
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        assert layer.unitary() is layer.unitary()  # computed once, then cached
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).sum().backward()
    opt.step()
    other.load_state_dict(layer.state_dict())
    other.train()  # train mode never reads the cache: a fresh reference
    with torch.no_grad():
        after = layer(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, other(x), rtol=0, atol=0)
    assert layer.lipschitz_bound() == other.lipschitz_bound()


def test_train_mode_recomputes_and_backpropagates():
    layer = _layer(2, 3, 3, (4, 5)).train()
    assert layer.unitary() is not layer.unitary()
    layer(torch.randn(2, 2, 4, 5, dtype=torch.float64)).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": -2}, "out_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (3,)}, "kernel_size"),
        ({"input_size": (5, 0)}, "input_size"),
        ({"kernel_size": 7}, "kernel_size"),  # larger than the 5 x 6 grid
    ],
)
def test_bad_constructor_arguments_raise(kwargs, name):
    args = {"in_channels": 3, "out_channels": 3, "kernel_size": 3, "input_size": (5, 6)}
    with pytest.raises(ValueError, match=name):
        CayleyConv2d(**{**args, **kwargs})


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (2, 4, 5, 6), (3, 5, 6)])
def test_wrong_input_shape_names_the_layer_and_both_shapes(shape):
    layer = CayleyConv2d(3, 3, 3, (5, 6))
    with pytest.raises(ValueError, match="CayleyConv2d") as err:
        layer(torch.zeros(shape))
    assert "(B, 3, 5, 6)" in str(err.value)
    assert str(shape) in str(err.value)
