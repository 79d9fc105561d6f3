"""OrthoLinear: norm <= 1 (exact Jacobians), near-orthogonality, presets, retraction, export, state,
cache."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL
from test_spectral import (
    check_eval_cache_follows_updates,
    check_export,
    check_float32_weight_is_covered,
    check_sound_before_and_after_adversarial_steps,
    check_state_dict_round_trip,
    check_train_mode_backpropagates,
)
from tiny_run import write_tiny_config
from torch import nn

from lipcert.bounds.operator import (
    DEFECT_CHOLESKY_MIN_SIZE,
    DEFECT_TOLERANCE,
    gram_spectral_bound,
    semi_unitary_spectral_bound,
)
from lipcert.config import load_config
from lipcert.nn.constraint import original
from lipcert.nn.orthogonal import (
    BJORCK_PRESETS,
    OrthoLinear,
    bjorck_orthogonalizer,
    guarded_bjorck_step,
    retract_,
    retract_after_steps,
)
from lipcert.train import train

#: Documented preset tolerances (BJORCK_PRESETS docstring): ||W^T W - I||_2, float64.
PRESET_TOLERANCE = {
    "orthogonal + noise": {"fast": 2e-8, "default": 1e-14, "precise": 1e-14, "adaptive": 1e-14},
    "torch default": {"precise": 1e-14},
}
#: Relative size of the noise added to an orthogonal start (a weight moved by training).
NOISE = 0.3

features = st.integers(1, 6)
presets = st.sampled_from(["fast", "default", "precise", "adaptive", 0, 3])
#: Every way to build the layer: Björck presets and step counts, and retraction.
options = st.one_of(
    presets.map(lambda preset: {"bjorck_iters": preset}),
    st.sampled_from([{"retraction": 1}, {"retraction": 2}]),
)


def _ortho(in_features=5, out_features=4, seed=0, dtype=torch.float32, **kwargs) -> OrthoLinear:
    torch.manual_seed(seed)
    return OrthoLinear(in_features, out_features, dtype=dtype, **kwargs)


def _defect(weight: torch.Tensor) -> float:
    """||W^T W - I||_2 on the smaller Gram matrix."""
    gram = weight.mT @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.mT
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return float(torch.linalg.matrix_norm(gram - eye, ord=2))


@given(features, features, options)
def test_norm_is_at_most_one_at_init_and_after_adversarial_steps(n_in, n_out, kwargs):
    layer = OrthoLinear(n_in, n_out, **kwargs)
    check_sound_before_and_after_adversarial_steps(layer, (n_in,))


@given(features, features, options)
def test_float32_weight_is_covered_by_its_bound(n_in, n_out, kwargs):
    check_float32_weight_is_covered(_ortho(n_in, n_out, **kwargs), (n_in,))


@pytest.mark.parametrize("kwargs", [{}, {"retraction": 2}])
@pytest.mark.parametrize(("n_in", "n_out"), [(16, 16), (24, 8), (8, 24)])
def test_orthogonal_and_gradient_norm_preserving_during_training(n_in, n_out, kwargs):
    layer = _ortho(n_in, n_out, dtype=torch.float64, **kwargs)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05 if not kwargs else 0.005)
    retract_after_steps(opt, layer)  # a no-op without retraction
    for step in range(4):
        with torch.no_grad():
            weight = layer.weight
            assert _defect(weight) <= LIPSCHITZ_TOL
            bound = layer.lipschitz_bound()
        assert 1 <= bound <= 1 + LIPSCHITZ_TOL  # tight thanks to the semi-unitary bound
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, n_in, dtype=torch.float64, generator=gen, requires_grad=True)
        out = layer(x)
        if n_out >= n_in:  # orthonormal columns: ||W x|| = ||x||
            torch.testing.assert_close(out - layer.bias, x @ weight.T)
            torch.testing.assert_close((out - layer.bias).norm(dim=1), x.norm(dim=1))
        grad_out = torch.randn_like(out)
        (grad_in,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
        if n_out <= n_in:  # orthonormal rows: ||W^T g|| = ||g||
            torch.testing.assert_close(grad_in.norm(dim=1), grad_out.norm(dim=1))
        opt.zero_grad()
        (-out.square().sum()).backward()
        opt.step()


@pytest.mark.parametrize("n", [64, 256])
def test_presets_reach_their_documented_tolerance(n):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        starts = {
            "orthogonal + noise": nn.init.orthogonal_(torch.empty(n, n, dtype=torch.float64),
                                                      generator=gen)
            + NOISE / math.sqrt(n) * torch.randn(n, n, dtype=torch.float64, generator=gen),
            "torch default": nn.init.kaiming_uniform_(torch.empty(n, n, dtype=torch.float64),
                                                      a=math.sqrt(5), generator=gen),
        }  # fmt: skip
        for start, tolerances in PRESET_TOLERANCE.items():
            for preset, tolerance in tolerances.items():
                assert _defect(BJORCK_PRESETS[preset](starts[start])) <= tolerance


def test_each_bjorck_step_keeps_the_norm_at_most_one():
    weight = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in range(8):
        result = bjorck_orthogonalizer(steps)(weight * 100)
        assert torch.linalg.matrix_norm(result, ord=2) <= 1 + LIPSCHITZ_TOL
    assert torch.equal(bjorck_orthogonalizer(0)(weight), weight / gram_spectral_bound(weight))


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.9, 2.0, 3.0, 1e3])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_one_guarded_bjorck_step_has_norm_at_most_one(shape, scale):
    """|f(s)| <= 1 on [0, 2] and the guard keeps every singular value there, whatever the weight;
    singular values spread over [0, scale] put some at the edge of the guard."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64, generator=gen))
    k = min(shape)
    s = torch.linspace(0, scale, k, dtype=torch.float64)
    weight = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    for dtype in (torch.float64, torch.float32):
        step = guarded_bjorck_step(weight.to(dtype)).double()
        assert torch.linalg.matrix_norm(step, ord=2) <= 1 + LIPSCHITZ_TOL


def test_retraction_steps_restore_orthogonality():
    gen = torch.Generator().manual_seed(0)
    orthogonal = nn.init.orthogonal_(torch.empty(64, 32, dtype=torch.float64), generator=gen)
    layer = OrthoLinear(32, 64, dtype=torch.float64, retraction=2)
    with torch.no_grad():  # an orthogonal weight moved as by a large optimizer step
        original(layer).copy_(
            orthogonal + 0.1 / 8 * torch.randn(64, 32, generator=gen, dtype=torch.float64)
        )
    assert _defect(original(layer)) > 0.05
    assert retract_(nn.Sequential(layer, nn.ReLU(), OrthoLinear(4, 4))) == 1
    assert _defect(original(layer)) <= 1e-3  # two steps: 0.1 -> ~1.5e-2 -> ~3e-4
    assert 1 <= layer.lipschitz_bound() <= 1 + 1e-3


def test_retraction_restores_a_collapsed_weight():
    """Half the singular values near 0 (measured in a 1024-wide run whose retraction had shrunk
    them): the retraction keeps stepping until the weight is orthogonal again."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=gen))
    collapsed = torch.cat([torch.full((32,), 1e-5), torch.linspace(0.5, 1.6, 32)]).double()
    layer = OrthoLinear(64, 64, dtype=torch.float64, retraction=2)
    with torch.no_grad():
        original(layer).copy_(u @ torch.diag(collapsed) @ v.T)
    retract_(layer)
    singular = torch.linalg.svdvals(original(layer))
    assert singular.min() >= 0.9 and singular.max() <= 1 + 1e-6


@pytest.mark.parametrize("top", [2.5, 3.0, 5.0])
def test_retraction_recovers_a_large_singular_value_hidden_from_its_estimate(top):
    """The top singular vector is orthogonal to the power iteration's start (ones), so the first
    scale estimate misses sigma = top > sqrt(3), where Björck leaves [0, 1]; the next steps' Gram
    matrices expose it (measured: the weight still ends orthogonal, not diverged)."""
    v = torch.linalg.qr(torch.tensor([[1.0, -1, 0, 0], [0, 0, 1, -1], [1, 1, 0, 0], [0, 0, 1, 1]],
                                     dtype=torch.float64).T)[0]  # fmt: skip
    layer = OrthoLinear(4, 4, dtype=torch.float64, retraction=2)
    with torch.no_grad():
        original(layer).copy_(v @ torch.diag(torch.tensor([top, 1, 1, 1]).double()) @ v.T)
    retract_(layer)
    singular = torch.linalg.svdvals(original(layer).detach())
    assert singular.min() >= 0.95 and singular.max() <= 1 + 1e-6


def test_training_loop_retracts_after_every_step(tmp_path):
    config = load_config(write_tiny_config(tmp_path, epochs=1))
    config.model.name, config.model.kwargs = "gnp_mlp", {"width": 16, "depth": 2, "retraction": 1}
    model, _ = train(config, tmp_path / "run")
    for layer in model.modules():
        if isinstance(layer, OrthoLinear):
            assert _defect(original(layer).double()) <= 1e-3  # drifts far without retraction


@pytest.mark.parametrize("kwargs", [{}, {"retraction": 2}])
def test_export_state_cache_and_training(kwargs):
    def make(**more) -> OrthoLinear:
        return _ortho(**kwargs, **more)

    check_export(make(), (5,), nn.Linear)
    check_state_dict_round_trip(make, (5,))
    check_eval_cache_follows_updates(make, (5,))
    check_train_mode_backpropagates(make(), (5,))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bjorck_iters": "exact"}, "bjorck_iters"),
        ({"bjorck_iters": -1}, "bjorck_iters"),
        ({"bjorck_iters": 2.5}, "bjorck_iters"),
        ({"retraction": -1}, "retraction"),
        ({"retraction": 1.5}, "retraction"),
        ({"retraction": True}, "retraction"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _ortho(**kwargs)


def test_wrong_input_shape_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match="OrthoLinear") as err:
        _ortho()(torch.zeros(2, 4))
    assert "(*, 5)" in str(err.value) and "(2, 4)" in str(err.value)


@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (96, 40), (30, 70)])
@pytest.mark.parametrize("noise", [1e-7, 1e-5, 1e-2])
def test_near_orthogonal_bound_of_real_matrices_is_sound_and_tight(rows, cols, noise):
    # Real Q takes the float64 path (complex128 before): each bound is >= the exact float64 norm
    # of the float32 matrix, at most sqrt(1 + ||Q^T Q - I||_F), and tight near orthogonality:
    # LAPACK's eigenvalues (below DEFECT_CHOLESKY_MIN_SIZE rows) to 1e-6, the Cholesky ladder's
    # shifts (from it on) within DEFECT_TOLERANCE of sigma^2, as documented. At 64 x 64 and noise
    # 1e-7 the ladder's first rung fails (lambda_max(D) 2.3e-6, d + s 1.8e-6) and the next passes:
    # sigma + 1.1e-6 on two threads, + 0.99e-6 on one (QR's rounding moves d).
    gen = torch.Generator().manual_seed(rows + cols)
    q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen))[0]
    q = q if rows >= cols else q.T
    q = (q + noise * torch.randn(q.shape, generator=gen)).float()
    exact = float(torch.linalg.matrix_norm(q.double(), ord=2))
    gram = q.double().T @ q.double() if rows >= cols else q.double() @ q.double().T
    defect = float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype)))
    bound = semi_unitary_spectral_bound(q)
    assert exact <= bound <= math.sqrt(1 + defect) * (1 + 1e-12)
    if noise == 1e-7 and min(rows, cols) < DEFECT_CHOLESKY_MIN_SIZE:
        assert bound <= exact + 1e-6
    elif noise == 1e-7:
        assert bound**2 <= exact**2 + DEFECT_TOLERANCE + 1e-9  # + the tests' slack, 16 n^2 u
