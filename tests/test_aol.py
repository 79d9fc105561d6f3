"""AOLLinear / AOLConv2d: exact Jacobian norms, sound bounds, init, export, state, eval cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps, jacobian_matrix, max_jacobian_norm
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.export import export
from lipcert.models import build_model
from lipcert.nn import correlation
from lipcert.nn.aol import (
    RESCALE_SIDES,
    ROW_SUM_MARGIN,
    AOLConv2d,
    AOLLinear,
    as_kernel,
    correlation_row_sums,
    orthogonal_centre_,
)
from lipcert.nn.constraint import original
from lipcert.nn.correlation import abs_correlation_sums, kernel_self_correlation
from lipcert.precision import ieee_float32

#: Largest allowed gap between a lipcert layer's output and its export's (house rule).
EXPORT_TOL = 1e-5
#: Slack of "bound >= measured norm" for the float64 SVD of the measurement itself.
SVD_SLACK = 1e-12


def assert_one_lipschitz_and_bounded(layer: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Exact float64 Jacobian norm <= 1 + tol (train and eval), and the layer's own bound, which
    covers its current (float32) weights, is <= 1 + tol and above the exported function's norm."""
    for training in (True, False):
        probe = copy.deepcopy(layer).train(training)
        assert max_jacobian_norm(probe, input_shape) <= 1 + LIPSCHITZ_TOL
    bound = layer.lipschitz_bound()
    measured = max_jacobian_norm(export(layer), input_shape)  # the same weights, in float64
    assert measured <= bound + SVD_SLACK
    assert bound <= 1 + LIPSCHITZ_TOL


def scale_raw_weight(layer: nn.Module, scale: float, seed: int) -> nn.Module:
    """Replace the unconstrained weight by large random values."""
    with torch.no_grad():
        raw = original(layer)
        gen = torch.Generator().manual_seed(seed)
        raw.copy_(scale * torch.randn(raw.shape, generator=gen, dtype=raw.dtype))
    return layer


@given(
    st.integers(1, 8),
    st.integers(1, 8),
    st.sampled_from([1.0, 100.0]),
    st.integers(0, 99),
    st.sampled_from(RESCALE_SIDES),
)
def test_aol_linear_is_one_lipschitz_at_init_and_after_adversarial_steps(
    n_in, n_out, scale, seed, rescale
):
    torch.manual_seed(seed)
    layer = AOLLinear(n_in, n_out, rescale=rescale)
    assert_one_lipschitz_and_bounded(layer, (n_in,))
    scale_raw_weight(layer, scale, seed)
    assert_one_lipschitz_and_bounded(layer, (n_in,))
    adversarial_steps(layer, (n_in,))
    assert_one_lipschitz_and_bounded(layer, (n_in,))


@st.composite
def conv_configs(draw):
    """(layer kwargs, input shape): stride 1-2, zero padding 0..k or circular <= (k-1)/2, either
    rescaled side."""
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "circular"]))
    max_pad = k if mode == "zeros" else (k - 1) // 2
    padding = draw(st.integers(0, max_pad))
    if stride == 1 and draw(st.booleans()):
        padding = "same"
    c_in, c_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    height, width = draw(st.integers(max(k, 5), 8)), draw(st.integers(max(k, 5), 8))
    rescale = draw(st.sampled_from(RESCALE_SIDES))
    kwargs = {"stride": stride, "padding": padding, "padding_mode": mode, "rescale": rescale}
    return (c_in, c_out, k), kwargs, (c_in, height, width)


@given(conv_configs(), st.sampled_from([1.0, 100.0]), st.integers(0, 99))
def test_aol_conv_is_one_lipschitz_for_any_stride_and_padding(config, scale, seed):
    args, kwargs, input_shape = config
    torch.manual_seed(seed)
    layer = AOLConv2d(*args, **kwargs)
    assert_one_lipschitz_and_bounded(layer, input_shape)
    scale_raw_weight(layer, scale, seed)
    assert_one_lipschitz_and_bounded(layer, input_shape)
    adversarial_steps(layer, input_shape)
    assert_one_lipschitz_and_bounded(layer, input_shape)


@pytest.mark.parametrize("rescale", ["output", "auto"])
@pytest.mark.parametrize(("c_in", "c_out"), [(5, 3), (3, 5)])
@pytest.mark.parametrize(
    ("stride", "padding", "padding_mode"),
    [(1, "same", "zeros"), (1, 2, "zeros"), (2, 1, "zeros"), (2, 1, "circular")],
)
def test_aol_conv_rescaling_the_output_is_one_lipschitz(
    rescale, c_in, c_out, stride, padding, padding_mode
):
    input_shape = (c_in, 7, 6)
    torch.manual_seed(0)
    layer = AOLConv2d(c_in, c_out, 3, stride, padding, padding_mode=padding_mode, rescale=rescale)
    scale_raw_weight(layer, 100.0, seed=c_in)
    assert_one_lipschitz_and_bounded(layer, input_shape)
    adversarial_steps(layer, input_shape)
    assert_one_lipschitz_and_bounded(layer, input_shape)
    x = torch.randn((4, *input_shape))
    for training in (True, False):
        with torch.no_grad():
            gap = export(layer)(x) - layer.train(training)(x)
        assert gap.abs().max() <= EXPORT_TOL


def _explicit_gram_row_sums(kernel: torch.Tensor, size: int, side: str = "input") -> torch.Tensor:
    """Absolute row sums of A^T A (``side="input"``) or A A^T ("output") at the central pixel of
    each channel of that side, A the convolution on a size x size zero-padded grid, as an
    explicit matrix."""
    c_in = kernel.shape[1]
    x = torch.zeros(c_in, size, size, dtype=torch.float64)
    a = jacobian_matrix(lambda v: F.conv2d(v, kernel, padding="same"), x)  # (out, in)
    gram = a.T @ a if side == "input" else a @ a.T
    rows = gram.abs().sum(dim=1).reshape(-1, size, size)  # (channels, size, size)
    return rows[:, size // 2, size // 2]


@pytest.mark.parametrize(
    ("rescale", "c_in", "c_out", "side"),
    [
        ("input", 5, 3, "input"),
        ("output", 3, 5, "output"),
        ("output", 4, 2, "output"),
        ("auto", 5, 3, "output"),
        ("auto", 3, 5, "input"),
        ("auto", 4, 4, "input"),
    ],
)
def test_rescale_scales_the_chosen_side_by_its_explicit_gram(rescale, c_in, c_out, side):
    layer = AOLConv2d(c_in, c_out, 3, rescale=rescale).double()
    scale_raw_weight(layer, 1.0, seed=c_in + c_out)
    raw = original(layer).detach()
    rows = _explicit_gram_row_sums(raw, size=13, side=side)  # 13 > 4k: no border within reach
    scales = (rows * (1 + ROW_SUM_MARGIN)).rsqrt()
    shape = (-1, 1, 1, 1) if side == "output" else (1, -1, 1, 1)
    torch.testing.assert_close(layer.weight.detach(), raw * scales.view(shape))


@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 3, 5]), st.integers(0, 99))
def test_self_correlation_gives_the_gram_of_the_convolution(c_in, c_out, k, seed):
    kernel = torch.randn((c_out, c_in, k, k), generator=torch.Generator().manual_seed(seed))
    kernel = kernel.double()
    corr = kernel_self_correlation(kernel)
    assert corr.shape == (c_in, c_in, 2 * k - 1, 2 * k - 1)
    expected = _explicit_gram_row_sums(kernel, size=4 * k + 1)  # no border within reach
    torch.testing.assert_close(correlation_row_sums(kernel), expected)


def test_init_is_orthogonal_or_a_coisometry():
    torch.manual_seed(0)
    for n_in, n_out in [(4, 8), (8, 4), (6, 6)]:
        sv = torch.linalg.svdvals(AOLLinear(n_in, n_out).weight.detach().double())
        torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-4, rtol=0)
    layer = AOLConv2d(4, 4, 3, padding_mode="circular").double()
    sv = torch.linalg.svdvals(jacobian_matrix(layer, torch.zeros(4, 5, 6, dtype=torch.float64)))
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-4, rtol=0)


def test_bound_is_sound_for_a_weight_the_rescaling_did_not_produce():
    torch.manual_seed(0)
    layer = scale_raw_weight(AOLLinear(5, 7), 10.0, seed=0)
    grown = 1.01 * layer.constrained_weight().double()
    bound = layer.constraint.operator_bound(layer, grown)
    exact = float(torch.linalg.matrix_norm(grown, ord=2))
    assert exact <= bound <= 1.01 * (1 + LIPSCHITZ_TOL)


@pytest.mark.parametrize(
    ("layer", "input_shape"),
    [
        (AOLLinear(6, 3), (6,)),
        (AOLConv2d(3, 5, 3, stride=2, padding=1), (3, 7, 6)),
        (AOLConv2d(2, 4, (3, 2), padding_mode="circular", bias=False), (2, 5, 6)),
        (AOLLinear(3, 6, rescale="output"), (3,)),
        (AOLConv2d(5, 3, 3, stride=2, padding=1, rescale="auto"), (5, 7, 6)),
    ],
)
def test_export_state_dict_and_eval_cache(layer, input_shape):
    scale_raw_weight(layer, 3.0, seed=1)
    x = torch.randn((4, *input_shape))
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        assert (export(layer)(x) - y).abs().max() <= EXPORT_TOL
        twin = scale_raw_weight(copy.deepcopy(layer), 1.0, seed=2)
        layer.load_state_dict(twin.state_dict())  # the cached constrained weight must follow
        assert torch.equal(layer(x), twin(x))
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).sum().backward()  # eval mode with grad: computed afresh
    opt.step()
    with torch.no_grad():
        fresh = layer.constraint.constrain(original(layer))
        torch.testing.assert_close(layer.weight, fresh, rtol=0, atol=0)


def test_rescale_is_a_constructor_argument_outside_the_state_dict():
    """Checkpoints of either side share their keys; the side comes from the constructor."""
    torch.manual_seed(0)
    layer = scale_raw_weight(AOLConv2d(5, 3, 3, rescale="auto"), 1.0, seed=0)
    assert layer.state_dict().keys() == AOLConv2d(5, 3, 3).state_dict().keys()
    twin = AOLConv2d(5, 3, 3, rescale="auto")
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))
    assert "rescale='auto'" in repr(layer)


def test_lipschitz_upper_bound_of_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        AOLConv2d(3, 8, 3),
        nn.ReLU(),
        AOLConv2d(8, 8, 3, stride=2, padding=1),
        nn.Flatten(),
        AOLLinear(8 * 3 * 3, 10),
    )
    assert lipschitz_upper_bound(model, input_shape=(3, 6, 6)) <= 1 + LIPSCHITZ_TOL


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="in_features"):
        AOLLinear(0, 3)
    with pytest.raises(ValueError, match="out_channels"):
        AOLConv2d(2, -1, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        AOLConv2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding"):
        AOLConv2d(2, 2, 3, padding=2, padding_mode="circular")
    with pytest.raises(ValueError, match="stride"):
        AOLConv2d(2, 2, 3, stride=2)  # 'same' padding
    allowed = r"rescale must be one of \('input', 'output', 'auto'\), got 'outputs'"
    with pytest.raises(ValueError, match=allowed):
        AOLConv2d(2, 2, 3, rescale="outputs")
    with pytest.raises(ValueError, match=allowed):
        AOLLinear(2, 2, rescale="outputs")


def test_wrong_input_shape_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match=r"AOLLinear expects input \(\*, 3\), got \(2, 5\)"):
        AOLLinear(3, 4)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"AOLConv2d expects input \(B, 3, H, W\), got \(1, 2, "):
        AOLConv2d(3, 4, 3)(torch.zeros(1, 2, 5, 5))


@pytest.mark.parametrize(
    ("rescale", "c_in", "c_out"),
    [("input", 3, 5), ("input", 4, 4), ("auto", 3, 5), ("auto", 4, 4), ("auto", 5, 3)],
)
def test_matches_orthogonium_aol(rescale, c_in, c_out):
    """orthogonium rescales the input channels when out >= in and the output channels (AOL of
    W^T) when out < in: our rescale="auto" everywhere, our default "input" when out >= in. The
    layers agree up to our ROW_SUM_MARGIN."""
    aol = pytest.importorskip("orthogonium.layers.conv.AOL.aol")
    torch.manual_seed(0)
    ours = scale_raw_weight(AOLConv2d(c_in, c_out, 3, padding=1, rescale=rescale), 1.0, seed=c_in)
    theirs = aol.AOLConv2D(c_in, c_out, 3, padding=1, niter=1)
    with torch.no_grad():
        theirs.parametrizations.weight.original.copy_(original(ours))
        ratio = ours.weight / theirs.weight
    expected = torch.full_like(ratio, (1 + ROW_SUM_MARGIN) ** -0.5)
    torch.testing.assert_close(ratio, expected)


@pytest.mark.parametrize(
    ("c_out", "c_in", "kh", "kw"),
    [
        (3, 5, 3, 1),
        (4, 2, 1, 3),
        (2, 3, 2, 4),
        (5, 4, 5, 5),
        (3, 3, 1, 1),
        (3, 4, 7, 5),
        (6, 5, 3, 3),
        (1, 7, 3, 3),
    ],
)
def test_correlation_sums_equal_the_convolution(c_out, c_in, kh, kw):
    kernel = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64, requires_grad=True)
    fast = abs_correlation_sums(kernel)
    slow = kernel_self_correlation(kernel).abs().sum(dim=(-2, -1))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.rand(c_in, c_in, dtype=torch.float64)
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), kernel)
    (slow_grad,) = torch.autograd.grad((slow * weights).sum(), kernel)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (4, 2, 1, 1), (2, 3, 2, 4)])
def test_correlation_sums_of_a_transposed_view_equal_the_convolution(shape):
    """The output side passes ``weight.transpose(0, 1)``, a view: the same sums and gradients as
    the convolution's, with the gradient reaching the weight through the view."""
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fast = abs_correlation_sums(weight.transpose(0, 1))
    slow = kernel_self_correlation(weight.transpose(0, 1)).abs().sum(dim=(-2, -1))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.rand_like(fast)
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), weight)
    (slow_grad,) = torch.autograd.grad((slow * weights).sum(), weight)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-10)


def test_correlation_sums_backward_twice_with_retain_graph_gives_the_same_gradient():
    """The backward works in buffers of its own: the saved signs and symbols stay intact for a
    second backward through the same graph."""
    torch.manual_seed(0)
    kernel = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    loss = (abs_correlation_sums(kernel) * torch.rand(5, 5, dtype=torch.float64)).sum()
    (first,) = torch.autograd.grad(loss, kernel, retain_graph=True)
    (second,) = torch.autograd.grad(loss, kernel)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel_size", [(3, 3), (3, 2), (1, 1)])
def test_correlation_sums_under_vmap_over_kernels_equal_one_kernel_at_a_time(
    transposed, kernel_size
):
    """Under vmap the forward and backward allocate their results (no ``out=`` rules there);
    outside they write into buffers: both paths give the same sums and gradients, for kernels
    and for channel-transposed views (read in the layout of the tensor they view)."""
    torch.manual_seed(0)
    kernels = torch.randn(4, 5, 3, *kernel_size, dtype=torch.float64)
    if transposed:
        kernels = torch.randn(4, 3, 5, *kernel_size, dtype=torch.float64).transpose(1, 2)
    weights = torch.rand(3, 3, dtype=torch.float64)

    def loss(kernel: torch.Tensor) -> torch.Tensor:
        return (abs_correlation_sums(kernel) * weights).sum()

    sums = torch.func.vmap(abs_correlation_sums)(kernels)
    grads = torch.func.vmap(torch.func.grad(loss))(kernels)
    for kernel, batched_sums, batched_grad in zip(kernels, sums, grads, strict=True):
        torch.testing.assert_close(batched_sums, abs_correlation_sums(kernel), rtol=0, atol=1e-13)
        torch.testing.assert_close(batched_grad, torch.func.grad(loss)(kernel), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "shape",
    [(64, 64, 7, 7), (16, 32, 11, 11), (256, 128, 3, 3), (128, 128, 3, 3), (64, 3, 3, 3)],
)
def test_float32_row_sums_stay_far_inside_the_margin(shape):
    """The float32 schemes (the DFT; real points for 3 x 3; their matrices rounded from float64)
    against float64 row sums of the convolution: within 1e-6 relative (measured <= 3.7e-7 by the
    DFT, <= 8.5e-7 by real points near the AOL init), a hundredth of the ROW_SUM_MARGIN the
    forward adds."""
    torch.manual_seed(0)
    kernel = orthogonal_centre_(torch.empty(shape)) + 1e-3 * torch.randn(shape)
    rows = abs_correlation_sums(kernel).double().sum(dim=1)
    exact = kernel_self_correlation(kernel.double()).abs().sum(dim=(1, 2, 3))
    assert ((rows - exact).abs() / exact).max() <= 1e-6 <= ROW_SUM_MARGIN / 100


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (2, 4, 2, 3), (5, 3, 1, 1), (4, 2, 3, 2)])
def test_correlation_sums_backward_passes_gradcheck(shape):
    """The hand-written backwards (real points for 3 x 3, the DFT, dense) against finite
    differences."""
    torch.manual_seed(sum(shape))
    kernel = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(abs_correlation_sums, (kernel,))


@pytest.mark.parametrize("kernel_size", [(3, 2), (3, 3)])
def test_row_sum_jacobians_under_vmap_match_autograd(kernel_size):
    """vmap(jacrev(...)) over a batch of kernels (per-kernel Jacobians of the row sums) equals
    the Jacobian autograd gives one output at a time, by the DFT (3 x 2) and real points (3 x 3).
    It raised before: the backward added its products in place (``baddbmm_``), which vmap refuses
    for operands of different levels."""
    torch.manual_seed(0)
    kernels = torch.randn(2, 4, 3, *kernel_size, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(correlation_row_sums))(kernels)
    for kernel, jacobian in zip(kernels, jacobians, strict=True):
        kernel = kernel.clone().requires_grad_()
        rows = correlation_row_sums(kernel)
        for i in range(len(rows)):
            (expected,) = torch.autograd.grad(rows[i], kernel, retain_graph=True)
            torch.testing.assert_close(jacobian[i], expected)


@pytest.mark.parametrize(
    ("make", "input_shape"),
    [
        (lambda: AOLConv2d(3, 5, 3, rescale="input"), (2, 3, 6, 6)),
        (lambda: AOLConv2d(3, 5, 3, rescale="output"), (2, 3, 6, 6)),
        (lambda: AOLLinear(6, 4), (5, 6)),
    ],
)
def test_a_backward_run_inside_autocast_gives_the_gradient_of_one_run_outside(make, input_shape):
    """Training code that calls backward() inside ``torch.autocast`` (bfloat16 on the CPU): the
    row sums' backward runs with autocast off, as their forward does, and the weights' gradient
    is the one of a backward outside it, bit for bit. Before, the convolutions' backward raised
    a RuntimeError (bfloat16 products into float32 buffers) and the dense layer's products ran
    in bfloat16, silently (2% off)."""
    torch.manual_seed(0)
    layer = make().train()
    with torch.no_grad():
        original(layer).add_(0.3 * torch.randn_like(original(layer)))
    x = torch.randn(input_shape)
    grads = []
    for backward_inside in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append(original(layer).grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    kernel = as_kernel(original(layer).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = abs_correlation_sums(kernel)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, abs_correlation_sums(kernel))


def test_train_mode_layers_work_under_vmap():
    """torch.func.vmap over the batch (per-sample gradients and the like) in train mode."""
    torch.manual_seed(0)
    layer = AOLConv2d(3, 4, 3).double().train()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    batched = torch.func.vmap(lambda xi: layer(xi[None])[0])(x)
    torch.testing.assert_close(batched, layer(x), rtol=1e-12, atol=1e-12)


def test_models_pass_aol_rescale_to_their_aol_layers():
    model = build_model(
        "sll_convnet", input_shape=[1, 8, 8], num_classes=3, width=4, aol_rescale="auto"
    )
    aol = [m for m in model.modules() if isinstance(m, (AOLConv2d, AOLLinear))]
    assert aol and all(m.constraint.rescale == "auto" for m in aol)
    halving = [m for m in aol if isinstance(m, AOLConv2d) and m.out_channels < m.in_channels]
    assert halving and all(m.constraint.rescales_output(m.weight) for m in halving)
    bound = lipschitz_upper_bound(model.eval(), (1, 8, 8))
    assert bound <= 1.1  # 1-Lipschitz body (up to float slack) times the head's row norms
    with pytest.raises(ValueError, match="rescale"):
        build_model("sll_mlp", input_shape=[4], num_classes=3, aol_rescale="both")


def test_a_convolution_setting_changed_after_construction_is_refused_by_the_bound():
    """nn.Conv2d reads padding_mode, dilation and groups at every forward: a replicate padding set
    on a built AOL layer ran a convolution of norm 2.0 that the bound still called 1.0."""
    layer = AOLConv2d(1, 1, 3, bias=False).double()
    with torch.no_grad():
        original(layer).zero_()
        original(layer)[0, 0, 0, 0] = 1.0  # one corner tap
    layer.padding_mode = "replicate"
    jacobian = jacobian_matrix(layer, torch.randn(1, 5, 5, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(jacobian, 2))
    assert exact > 1.9
    with pytest.raises(ValueError, match="padding_mode='replicate' is not supported"):
        lipschitz_upper_bound(layer)
    for name, value, message in [("dilation", (2, 2), "dilation 1"), ("groups", 2, "one group")]:
        changed = AOLConv2d(2, 2, 3)
        setattr(changed, name, value)
        with pytest.raises(ValueError, match=message):
            lipschitz_upper_bound(changed)


def test_circular_padding_counts_what_the_forward_pads():
    """Circular padding pads by _reversed_padding_repeated_twice, set when the layer is built; a
    'same' even kernel pads k - 1 in all, one side more: a restriction of the circular map."""
    layer = AOLConv2d(2, 3, (3, 2), padding="same", padding_mode="circular", bias=False).double()
    bound = lipschitz_upper_bound(layer)
    assert bound <= 1 + LIPSCHITZ_TOL
    assert max_jacobian_norm(layer, (2, 5, 6)) <= bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rescale", ["input", "output"])
def test_aol_on_a_gpu_matches_the_cpu(rescale):
    """The batched correlation of other devices: the CPU's weights, gradients and a sound bound.
    Off AOL's init: there corr is exactly 0 off the centre, the computed values are rounding
    noise, and their signs (each a subgradient of |.| at 0) depend on the device; they moved the
    gradient by more than its size."""
    torch.manual_seed(0)
    cpu = AOLConv2d(16, 8, 3, rescale=rescale).train()
    with torch.no_grad():
        original(cpu).add_(0.05 * torch.randn_like(original(cpu)))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 16, 10, 10)
    with ieee_float32():  # no TF32 in the convolutions: the float32 results of the CPU
        cpu(x).square().sum().backward()
        gpu(x.cuda()).square().sum().backward()
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-5, atol=1e-6)
    grad_cpu, grad_gpu = original(cpu).grad, original(gpu).grad.cpu()
    scale = float(grad_cpu.abs().max())
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=1e-4, atol=1e-5 * scale)
    assert gpu.eval().lipschitz_bound() <= 1.0


@pytest.mark.parametrize("rescale", RESCALE_SIDES)
@pytest.mark.parametrize("conv", [False, True])
def test_the_bound_covers_float64_weights_whose_gram_underflows(rescale, conv):
    """Raw float64 weights ~1e-300: every product of the constrained weight's Gram underflowed
    and the bound was 0.0 against an exact norm of 1e-294."""
    torch.manual_seed(0)
    layer = AOLConv2d(3, 4, 3, rescale=rescale) if conv else AOLLinear(6, 5, rescale=rescale)
    layer = layer.double()
    with torch.no_grad():
        original(layer).mul_(1e-300)
    shape = (3, 5, 5) if conv else (6,)
    exact = max_jacobian_norm(layer, shape)
    assert 0 < exact <= layer.lipschitz_bound()


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_row_sums_of_huge_kernels_stay_finite_until_the_sums_overflow(kernel_size):
    """A kernel of 7e17s and one of 2e18s (sums 4e37 and 3.2e38 for 3 x 3): the real points'
    products overflowed (|K|(z) |K|(1/z) up to 760 squared entries) and the sums, then AOL's
    weight, came out NaN; divided by a power of two first, the sums are the float64 ones to
    float32 rounding, and AOL's weight is finite."""
    for value in (7e17, 2e18 * 9 / kernel_size**2):
        kernel = torch.full((1, 1, kernel_size, kernel_size), value)
        exact = kernel_self_correlation(kernel.double()).abs().sum(dim=(-2, -1))
        torch.testing.assert_close(abs_correlation_sums(kernel).double(), exact, rtol=1e-6, atol=0)
    layer = AOLConv2d(1, 1, kernel_size)
    with torch.no_grad():
        original(layer).fill_(7e17)
    assert torch.isfinite(layer.weight).all()


def test_power_of_two_prescaling_keeps_the_bits_of_ordinary_kernels():
    """Dividing by a power of two is exact, so the sums and the gradient of a kernel whose
    largest entry lies outside [1, 2) are the unscaled computation's, bit for bit (all three
    schemes)."""
    torch.manual_seed(0)
    for shape in [(8, 6, 3, 3), (8, 6, 5, 5), (8, 6, 1, 1)]:
        kernel = 0.1 * torch.randn(shape)
        sums_of, gradient = correlation._scheme(kernel)
        unscaled, values, signs = sums_of(kernel, False)
        weights = torch.rand_like(unscaled)
        expected = gradient(weights, values, signs, False, shape[2:]).view(shape)
        kernel.requires_grad_()
        sums = abs_correlation_sums(kernel)
        (sums * weights).sum().backward()
        assert torch.equal(sums, unscaled) and torch.equal(kernel.grad, expected)
