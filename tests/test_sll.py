"""SLLLinear / SLLConv2d: exact Jacobian norms, sound bounds, T, export, state, eval cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps, jacobian_matrix, max_jacobian_norm
from test_aol import EXPORT_TOL, SVD_SLACK, assert_one_lipschitz_and_bounded
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.certify import certify
from lipcert.export import export
from lipcert.nn.aol import ROW_SUM_MARGIN, correlation_row_sums
from lipcert.nn.residual import Residual, residual_bound, sll_form
from lipcert.nn.sll import SLLConv2d, SLLLinear, q_weights


def randomize(layer: nn.Module, scale: float, seed: int) -> nn.Module:
    """Large random K, a spread-out q and a random bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            spread = {"weight": scale, "log_q": 2.0}.get(name, 1.0)
            param.copy_(spread * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return layer


@given(st.integers(1, 8), st.integers(1, 10), st.sampled_from([1.0, 100.0]), st.integers(0, 99))
def test_sll_linear_is_one_lipschitz_at_init_and_after_adversarial_steps(n, inner, scale, seed):
    torch.manual_seed(seed)
    layer = SLLLinear(n, inner)
    assert_one_lipschitz_and_bounded(layer, (n,))
    randomize(layer, scale, seed)
    assert_one_lipschitz_and_bounded(layer, (n,))
    adversarial_steps(layer, (n,))
    assert_one_lipschitz_and_bounded(layer, (n,))


@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from([1, 3, 5]),
    st.tuples(st.integers(4, 7), st.integers(4, 7)),
    st.sampled_from([1.0, 100.0]),
    st.integers(0, 99),
)
def test_sll_conv_is_one_lipschitz_at_init_and_after_adversarial_steps(
    channels, inner, k, grid, scale, seed
):
    torch.manual_seed(seed)
    layer = SLLConv2d(channels, inner, k)
    shape = (channels, *grid)
    assert_one_lipschitz_and_bounded(layer, shape)
    randomize(layer, scale, seed)
    assert_one_lipschitz_and_bounded(layer, shape)
    adversarial_steps(layer, shape)
    assert_one_lipschitz_and_bounded(layer, shape)


def test_t_is_the_weighted_gershgorin_sum_of_the_gram():
    """c_i = 2 / t_i with t_i = sum_j |W^T W|_ij q_j / q_i (Araujo et al. 2023, Thm. 3), from an
    explicit Gram matrix; t' = (1 + ROW_SUM_MARGIN) t + eps."""
    layer = randomize(SLLLinear(5, 7), 1.0, seed=0).double()
    gram = layer.weight @ layer.weight.T  # W^T W, (inner, inner)
    q = torch.exp(layer.log_q)
    t = (gram.abs() @ q) / q
    scales, outer = layer.fold()
    torch.testing.assert_close(scales, 2 / (t * (1 + ROW_SUM_MARGIN)), rtol=1e-10, atol=0)
    torch.testing.assert_close(outer, layer.weight * scales[:, None])
    kernel = randomize(SLLConv2d(3, 4, 3), 1.0, seed=1).weight.detach().double()
    grid = torch.zeros(3, 11, 11, dtype=torch.float64)
    a = jacobian_matrix(lambda v: nn.functional.conv2d(v, kernel, padding=1), grid)  # W^T
    rows = (a @ a.T).abs().sum(dim=1).reshape(4, 11, 11)[:, 5, 5]  # central pixel: no border
    torch.testing.assert_close(correlation_row_sums(kernel.transpose(0, 1)), rows)


def _plain_residual(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """x - B^T relu(A x + bias) as plain float64 modules."""
    inner = nn.Linear(a.shape[1], a.shape[0], dtype=torch.float64)
    outer = nn.Linear(a.shape[0], a.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        inner.weight.copy_(a), inner.bias.copy_(bias), outer.weight.copy_(-b.T)
    return Residual(nn.Sequential(inner, nn.ReLU(), outer))


@pytest.mark.parametrize(
    ("inflation", "noise"), [(1.0, 0.0), (1.001, 0.0), (1.5, 0.0), (1.0, 1e-2)]
)
def test_residual_bound_is_honest_when_the_sdp_condition_fails(inflation, noise):
    """An outer weight larger than 2 T^-1 W, or not of the form C W^T at all, breaks
    1-Lipschitzness: the bound must grow with it (never 1.0 unverified) and stay above the exact
    Jacobian norm."""
    layer = randomize(SLLLinear(4, 3), 1.0, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # orthogonal rows of different norms: T = W^T W, a tight layer
        orthogonal = torch.linalg.qr(torch.randn(4, 4, generator=gen)).Q[:3]
        layer.weight.copy_(torch.tensor([[0.5], [2.0], [7.0]]) * orthogonal)
        layer.bias.fill_(100.0)  # all units active: the Jacobian is I - B^T A everywhere
        scales, outer = layer.fold()
        grown = inflation * outer + noise * outer.abs().max() * torch.randn(
            outer.shape, generator=gen
        )
        kernel, grown_kernel = layer.weight[..., None, None], grown[..., None, None]
        # inflation * scales: a fold that is exact (E ~ 0) but violates the SDP condition
        scales = inflation * scales
        bound = residual_bound(kernel, grown_kernel, scales, q_weights(layer.log_q))
    plain = _plain_residual(layer.weight.double(), grown.double(), layer.bias.double())
    measured = max_jacobian_norm(plain, (4,))
    assert measured <= bound + SVD_SLACK
    if (inflation, noise) == (1.0, 0.0):
        assert bound <= 1 + LIPSCHITZ_TOL
    else:
        assert measured > 1 + LIPSCHITZ_TOL  # a real violation, which the bound reports


def test_an_all_zero_unit_stays_finite_and_silent():
    layer = randomize(SLLConv2d(2, 3, 3), 1.0, seed=4)
    with torch.no_grad():
        layer.weight[1].zero_()
    x = torch.randn(2, 2, 5, 5)
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.fold()[0]).all()
    assert layer.fold()[1][1].abs().max() == 0
    assert layer.lipschitz_bound() <= 1 + LIPSCHITZ_TOL
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.equal(layer(x), x) and layer.lipschitz_bound() == 1.0


def _export_cases() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Fresh (layer, input shape) pairs for the export tests (each test gets its own layers)."""
    return [
        (SLLLinear(6, 9), (6,)),
        (SLLConv2d(3, 5, 3), (3, 6, 5)),
        (SLLConv2d(2, 4, 5, bias=False), (2, 5, 7)),
    ]


@pytest.mark.parametrize(("layer", "input_shape"), _export_cases())
def test_export_state_dict_and_eval_cache(layer, input_shape):
    randomize(layer, 3.0, seed=5)
    x = torch.randn((4, *input_shape))
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        assert (export(layer)(x) - y).abs().max() <= EXPORT_TOL
        twin = randomize(copy.deepcopy(layer), 1.0, seed=6)
        layer.load_state_dict(twin.state_dict())  # the cached outer weight must follow
        assert torch.equal(layer(x), twin(x))
        assert not torch.equal(layer(x), y)
        layer.log_q.add_(torch.arange(layer.log_q.numel()))  # q alone changes T
        torch.testing.assert_close(layer.folded()[2], layer.fold()[1], rtol=0, atol=0)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).pow(2).sum().backward()  # eval mode with grad: computed afresh
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer.folded()[2], layer.fold()[1], rtol=0, atol=0)


@pytest.mark.parametrize(("layer", "input_shape"), _export_cases())
def test_the_exported_layer_is_still_bounded_by_one(layer, input_shape):
    """The exported Residual(inner, ReLU, -B^T) is recognized as an SLL layer: its bound is SLL's
    (1), not the triangle inequality's 1 + ||B|| ||A|| (about 2), with q spread out (the Schur
    weights are recovered from the weights alone)."""
    randomize(layer, 3.0, seed=7).eval()
    plain = export(layer)
    assert sll_form(plain)
    assert lipschitz_upper_bound(plain, input_shape) <= 1 + LIPSCHITZ_TOL  # traced graph
    assert lipschitz_upper_bound(plain) <= 1 + LIPSCHITZ_TOL  # module rule
    assert max_jacobian_norm(copy.deepcopy(plain), input_shape) <= 1 + LIPSCHITZ_TOL


def _residual_of(inner: nn.Module, outer: nn.Module, seed: int, scale: float) -> nn.Module:
    """Residual(inner, ReLU, outer) with random weights and biases that keep most units on."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (inner.weight, outer.weight):
            param.copy_(scale * torch.randn(param.shape, generator=gen))
        inner.bias.copy_(3 + torch.randn(inner.bias.shape, generator=gen))
    return Residual(nn.Sequential(inner, nn.ReLU(), outer)).double()


SLL_SHAPED = [
    (lambda: nn.Linear(4, 5), lambda: nn.Linear(5, 4, bias=False), (4,)),
    (
        lambda: nn.Conv2d(2, 3, 3, padding=1),
        lambda: nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False),
        (2, 5, 4),
    ),
]


@pytest.mark.parametrize(("inner", "outer", "input_shape"), SLL_SHAPED)
@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("seed", range(3))
def test_any_weights_in_the_exported_form_are_bounded_soundly(
    inner, outer, input_shape, scale, seed
):
    """Weights that are no SLL layer (outer not C K, scales of either sign): the recovered
    scales and weights only make the bound tight or loose, never below the Jacobian."""
    plain = _residual_of(inner(), outer(), seed, scale)
    assert sll_form(plain)
    bound = lipschitz_upper_bound(plain, input_shape)
    assert max_jacobian_norm(plain, input_shape, n_points=5) <= bound + SVD_SLACK


@pytest.mark.parametrize(
    ("branch", "input_shape"),
    [
        (lambda: [nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)], (4,)),  # outer bias
        (lambda: [nn.Linear(4, 5), nn.LeakyReLU(0.5), nn.Linear(5, 4, bias=False)], (4,)),
        (
            lambda: [
                nn.Conv2d(2, 3, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.ConvTranspose2d(3, 2, 3, padding=1, stride=2, output_padding=1, bias=False),
            ],
            (2, 6, 6),
        ),
        (
            lambda: [
                nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
                nn.ReLU(),
                nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False),
            ],
            (2, 5, 5),
        ),
    ],
)
def test_other_residuals_are_traced_through(branch, input_shape):
    plain = Residual(nn.Sequential(*branch())).double()
    assert not sll_form(plain)
    bound = lipschitz_upper_bound(plain, input_shape)
    assert max_jacobian_norm(plain, input_shape) <= bound + SVD_SLACK


@pytest.mark.parametrize("dead", [[1], [0, 2]])
def test_an_exported_layer_with_all_zero_units_keeps_its_bound(dead):
    layer = randomize(SLLConv2d(2, 3, 3), 1.0, seed=11)
    with torch.no_grad():
        layer.weight[dead] = 0.0
    plain = export(layer.eval())
    assert sll_form(plain) and lipschitz_upper_bound(plain, (2, 5, 5)) <= 1 + LIPSCHITZ_TOL


def test_a_hook_on_the_exported_layer_falls_back_to_tracing():
    plain = export(randomize(SLLLinear(4, 6), 1.0, seed=8).eval())
    plain.branch[2].register_forward_hook(lambda module, args, out: 10 * out)
    assert not sll_form(plain)


def test_certify_gives_the_exported_model_the_radii_of_the_original():
    torch.manual_seed(9)
    model = nn.Sequential(
        SLLConv2d(2, 4, 3), SLLConv2d(2, 6, 3), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)
    )
    for layer in model[:2]:
        randomize(layer, 1.0, seed=10)
    model.eval()
    x = torch.randn(64, 2, 5, 5)
    y = model(x).argmax(dim=1)
    original = certify(model, x, y)
    exported = certify(export(model), x, y)
    torch.testing.assert_close(exported, original, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("layer", "input_shape"), [(SLLLinear(6, 12), (6,)), (SLLConv2d(3, 5, 3), (3, 6, 6))]
)
def test_a_data_write_keeps_forward_and_bound_consistent(layer, input_shape):
    """``weight.data`` writes bump no version counter: the eval forward keeps its cached K and B
    (an old, but whole, SLL layer), and the bound must describe that same layer (it used to fold
    K afresh: bound 1 for a forward of norm ~2-4)."""
    randomize(layer, 1.0, seed=8)
    layer.eval().requires_grad_(False)  # the cached path also under jacrev
    x = torch.randn((3, *input_shape))
    before = layer(x)  # builds the eval cache
    layer.weight.data.mul_(-3)
    assert torch.equal(layer(x), before)  # the cache did not see the write
    for point in x:
        jacobian = torch.func.jacrev(layer)(point).reshape(point.numel(), point.numel())
        norm = torch.linalg.matrix_norm(jacobian.double(), ord=2)
        assert norm <= layer.lipschitz_bound() * (1 + 1e-5)


def test_autocast_does_not_lower_the_precision_of_t():
    layer = randomize(SLLConv2d(3, 5, 3), 1.0, seed=10)
    with torch.no_grad():
        expected = layer.fold()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded = layer.fold()
    for got, want in zip(folded, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    layer = randomize(SLLConv2d(3, 5, 3), 1.0, seed=7)
    x = torch.randn(2, 3, 6, 5)
    export(layer, onnx_path=tmp_path / "sll.onnx", input_shape=(3, 6, 5))
    (out,) = ort.InferenceSession(str(tmp_path / "sll.onnx")).run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - layer.eval()(x)).abs().max() <= EXPORT_TOL


def test_network_bounds_compose():
    torch.manual_seed(0)
    model = nn.Sequential(SLLConv2d(3, 6, 3), SLLConv2d(3, 4, 3), nn.Flatten(), SLLLinear(48, 16))
    assert lipschitz_upper_bound(model, input_shape=(3, 4, 4)) <= 1 + LIPSCHITZ_TOL
    plain = Residual(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 5)))  # outer bias
    branch = lipschitz_upper_bound(plain.branch)
    bound = lipschitz_upper_bound(plain, input_shape=(5,))  # generic: sound, loose
    assert 1 + branch <= bound <= math.nextafter(1 + branch, math.inf)  # the sum rounded up


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="inner_features"):
        SLLLinear(3, 0)
    with pytest.raises(ValueError, match="features"):
        SLLLinear(-2, 3)
    with pytest.raises(ValueError, match="channels"):
        SLLConv2d(0, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        SLLConv2d(3, 3, kernel_size=2)


def test_wrong_input_shape_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match=r"SLLLinear expects input \(\*, 3\), got \(2, 5\)"):
        SLLLinear(3, 4)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"SLLConv2d expects input \(B, 3, H, W\), got \(2, 5\)"):
        SLLConv2d(3, 4)(torch.zeros(2, 5))


def test_matches_orthogonium_dense_with_the_same_weights_and_q():
    sll = pytest.importorskip("orthogonium.layers.conv.SLL")
    ours = randomize(SLLLinear(6, 10), 1.0, seed=8)
    theirs = sll.SDPBasedLipschitzDense(6, 6, 10)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight), theirs.bias.copy_(ours.bias), theirs.q.copy_(ours.log_q)
        x = torch.randn(4, 6)
        branch_ours, branch_theirs = ours(x) - x, theirs(x) - x
    torch.testing.assert_close(branch_ours * (1 + ROW_SUM_MARGIN), branch_theirs)


def test_matches_orthogonium_conv_block_with_q_one_and_rescaled_bias():
    """orthogonium's block is x - 2 conv_T(relu(conv(x, s K) + b'), s K), s the AOL row scale of
    K: equal to ours with q = 1 and b' = s b. Its own q cancels (q_i / q_i), so it has no effect."""
    sll = pytest.importorskip("orthogonium.layers.conv.SLL")
    ours = randomize(SLLConv2d(3, 6, 3), 1.0, seed=9)
    theirs = sll.SDPBasedLipschitzResBlock(3, 2, kernel_size=3)
    with torch.no_grad():
        ours.log_q.zero_()
        row_scale = correlation_row_sums(ours.weight.transpose(0, 1)).rsqrt()
        theirs.parametrizations.kernel.original.copy_(ours.weight)
        theirs.bias.copy_((row_scale * ours.bias).view(1, -1, 1, 1))
        x = torch.randn(2, 3, 5, 6)
        branch_ours, branch_theirs = ours(x) - x, theirs(x) - x
        theirs.parametrizations.kernel[0].q.normal_()
        assert torch.allclose(theirs(x) - x, branch_theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(branch_ours * (1 + ROW_SUM_MARGIN), branch_theirs)
