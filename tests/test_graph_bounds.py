"""Whole-network bounds of traced models: sound against exact Jacobians, refusals named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lipschitz import jacobian_norm, worst_points
from torch import nn

import lipcert
from lipcert.attacks import pgd
from lipcert.bounds import graph as graph_module
from lipcert.bounds.graph import graph_bound
from lipcert.bounds.network import BOUND_RULES, module_bound, register_bound_rule
from lipcert.bounds.rules import ACTIVATION_CONSTANTS, GELU_LIPSCHITZ, GELU_TANH_LIPSCHITZ
from lipcert.certify import certify, radii_from_logits, summarize
from lipcert.nn import Residual


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.normal_(generator=gen)
                module.running_var.uniform_(0.2, 3.0, generator=gen)
                module.weight.normal_(generator=gen)
    return model


class ConvNet(nn.Module):
    """Strided / dilated / grouped convolutions in every padding mode, BN, residual, cat, pools."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="circular")
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.side = nn.Conv2d(2, 3, 1, stride=2, bias=False)
        self.pool = nn.MaxPool2d(2, stride=1)  # overlapping windows
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.head = nn.Linear(7 * 3 * 3, 3)

    def forward(self, x):
        h = F.leaky_relu(self.bn(self.stem(x)), 0.3)
        h = h + 0.5 * torch.tanh(self.dilated(h))
        h = torch.cat([self.reflect(h), self.side(x)], dim=1)
        h = self.avg(self.pool(F.gelu(h)))
        return self.head(h.flatten(1))


class SequenceNet(nn.Module):
    """Conv1d, functional ops, reductions, stack, slicing, constant products, adaptive pools."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="replicate")
        self.depthwise = nn.Conv1d(4, 4, 2, groups=4)
        self.act = nn.Sequential(nn.ELU(0.5), nn.SiLU(), nn.Dropout(0.3))
        self.mix = nn.Parameter(torch.randn(4, 5))
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.apool, self.mpool = nn.AdaptiveAvgPool1d(3), nn.AdaptiveMaxPool1d(4)
        self.out = nn.Parameter(torch.randn(2, 30))

    def forward(self, x):
        h = self.act(self.conv(x))  # (B, 4, 5)
        h = F.mish(self.depthwise(F.pad(h, (1, 1), mode="reflect")))  # (B, 4, 6)
        a, b = h[:, :, :3], h[:, :, 3:]
        pooled = torch.stack(
            [a - b / 3, self.apool(F.softplus(h, threshold=math.inf))], dim=1
        ).flatten(1)  # 24
        mixed = (F.hardswish(h).transpose(1, 2) @ self.mix) * self.scale  # (B, 6, 5)
        summary = torch.cat([mixed.mean(dim=1), self.mpool(h).sum(dim=2) / 2], dim=1)  # 9
        return F.linear(torch.cat([pooled, summary[:, :6]], dim=1), self.out)


class Activations(nn.Module):
    """Every activation on one hidden layer, side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.acts = nn.ModuleList([
            nn.Sigmoid(), nn.Hardsigmoid(), nn.Softsign(), nn.CELU(), nn.SELU(), nn.PReLU(),
            nn.RReLU(), nn.Hardtanh(), nn.ReLU6(), nn.LogSigmoid(), nn.Tanhshrink(),
            nn.Softshrink(), nn.GELU("tanh"), nn.Mish(), nn.Softplus(threshold=math.inf),
            nn.Hardswish(),
        ])  # fmt: skip
        self.out = nn.Linear(6 * len(self.acts), 3)

    def forward(self, x):
        h = 2 * self.hidden(x)
        return self.out(torch.cat([act(h) for act in self.acts], dim=1))


def image_chain() -> nn.Sequential:
    return nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(2, 4, 3), nn.ReLU(),
        Residual(nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))),
        nn.ReplicationPad2d((1, 0, 0, 1)), nn.CircularPad2d(1),
        nn.MaxPool2d(2, stride=1, dilation=2),
        nn.PixelUnshuffle(2), nn.AvgPool2d(2, stride=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 3),
    )  # fmt: skip


NETS = {
    "conv": (ConvNet, (2, 8, 8)),
    "sequence": (SequenceNet, (3, 10)),
    "activations": (Activations, (5,)),
    "image chain": (image_chain, (2, 7, 7)),
}


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("name", list(NETS))
def test_bound_covers_exact_jacobian_norms(name, norm):
    factory, shape = NETS[name]
    torch.manual_seed(0)
    model = randomize_batch_norms(factory()).double().eval()
    bound = lipcert.lipschitz_upper_bound(model, shape, norm)
    norms = worst_points(model, shape, norm)
    assert max(norms) <= bound
    assert max(norms) > 0


class Lambda(nn.Module):
    """A graph written as a function (traced by torch.fx), with a constant 2 x 3 matrix and
    linear layers x -> x / 2 and x -> -x / 2."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.matrix = nn.Parameter(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))
        self.halve, self.neg_halve = _scaled_identity(0.5), _scaled_identity(-0.5)

    def forward(self, x):
        return self.fn(self, x)


def _scaled_identity(scale: float) -> nn.Linear:
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(scale * torch.eye(3))
    return linear


#: Linear graphs whose bound is attained: (forward, input shape, exact l2, exact l_inf constant).
#: A rule that under-estimates fails here, and so does one that is looser than its proof.
EXACT_GRAPHS = {
    "residual": (lambda m, x: x + m.halve(x), (3,), 1.5, 1.5),
    "difference": (lambda m, x: x - m.neg_halve(x), (3,), 1.5, 1.5),
    "cat": (lambda m, x: torch.cat([x, 2 * x], dim=1), (3,), math.sqrt(5), 2.0),
    "stack": (lambda m, x: torch.stack([x, -x], dim=1), (3,), math.sqrt(2), 1.0),
    "sum": (lambda m, x: x.sum(dim=1), (4,), 2.0, 4.0),
    "mean": (lambda m, x: x.mean(dim=(1, 2)), (3, 4), 1 / math.sqrt(12), 1.0),
    "scale": (lambda m, x: 3 * x / 2, (3,), 1.5, 1.5),
    "broadcast": (lambda m, x: x[:, None, :] + torch.zeros(4, 1), (3,), 2.0, 1.0),
    "reflect pad": (lambda m, x: F.pad(x, (2, 2), mode="reflect"), (1, 6), math.sqrt(2), 1.0),
    "slice": (lambda m, x: x[:, 1:, ::2], (3, 4), 1.0, 1.0),
    "matmul": (lambda m, x: x @ m.matrix.T, (3,), None, 3.0),
    "max pool": (lambda m, x: F.max_pool1d(x, 2, stride=1), (1, 6), math.sqrt(2), 1.0),
    "adaptive max pool": (lambda m, x: F.adaptive_max_pool1d(x, 4), (1, 5), math.sqrt(2), 1.0),
}


@pytest.mark.parametrize("name", list(EXACT_GRAPHS))
def test_graph_rules_are_exact_on_linear_graphs(name):
    fn, shape, exact_l2, exact_linf = EXACT_GRAPHS[name]
    model = Lambda(fn).double()
    x = torch.tensor([0.0, 1.0] * 6, dtype=torch.float64)[: math.prod(shape)].reshape(shape)
    if exact_l2 is None:  # the matrix's spectral norm
        exact_l2 = float(torch.linalg.matrix_norm(model.matrix.detach(), ord=2))
    for norm, exact in (("l2", exact_l2), ("linf", exact_linf)):
        assert float(jacobian_norm(model, x, norm)) == pytest.approx(exact, rel=1e-12)
        assert lipcert.lipschitz_upper_bound(model, shape, norm) == pytest.approx(exact, rel=1e-9)


def test_every_layer_bound_covers_its_own_jacobian():
    """Each rule on its own, at the shape the trace gave it: a wrong constant shows up here."""
    torch.manual_seed(1)
    model = randomize_batch_norms(ConvNet()).double().eval()
    for record in graph_bound(model, (2, 8, 8)).nodes:
        if record.module is not None:
            worst = max(worst_points(record.module, record.input_shape, "l2", seed=2))
            assert worst <= record.factor, record.name


def test_residual_sum_is_one_plus_the_branch():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = branch

        def forward(self, x):
            return x + self.branch(x)

    bound, expected = lipcert.lipschitz_upper_bound(Skip(), (4,)), 1 + module_bound(branch)
    assert bound >= expected and bound == pytest.approx(expected, rel=1e-13)  # rounded up


def test_sequential_bound_uses_the_input_size_of_each_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2))
    at_size = lipcert.lipschitz_upper_bound(model, (3, 6, 6))
    every_size = lipcert.lipschitz_upper_bound(model)
    shapes = [(3, 6, 6), (4, 6, 6)]
    product = module_bound(model[0], "l2", shapes[0]) * module_bound(model[2], "l2", shapes[1])
    assert at_size == pytest.approx(product, rel=1e-15)
    assert at_size < every_size


def test_overlapping_max_pool_attains_sqrt_uses():
    """1-D windows of 2, stride 1: an alternating input routes each peak to two outputs, so the
    constant is sqrt(2), not 1."""
    pool = nn.MaxPool1d(2, stride=1)
    x = torch.tensor([[0.0, 1.0] * 4], dtype=torch.float64)  # (1, 8): channels x length
    exact = float(jacobian_norm(pool, x, "l2"))
    assert exact == pytest.approx(math.sqrt(2), rel=1e-12)
    assert module_bound(pool, "l2") == pytest.approx(math.sqrt(2))


def test_batch_norm_bound_is_exact():
    bn = randomize_batch_norms(nn.BatchNorm2d(5)).double().eval()
    exact = float(jacobian_norm(bn, torch.randn(5, 2, 2, dtype=torch.float64), "l2"))
    assert module_bound(bn, "l2") == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="training mode"):
        module_bound(bn.train(), "l2")
    with pytest.raises(TypeError, match="running statistics"):
        module_bound(nn.BatchNorm1d(3, track_running_stats=False).eval(), "l2")
    instance = nn.InstanceNorm1d(3, track_running_stats=True).eval()
    instance.track_running_stats = False  # buffers kept, but torch now uses the input's statistics
    with pytest.raises(TypeError, match="running statistics"):
        module_bound(instance, "l2")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 1, "padding": 1},
        {"stride": 2, "padding": 1, "output_padding": 1},
        {"stride": 2, "padding": 0, "groups": 2},
        {"stride": 1, "padding": 2, "dilation": 2},
    ],
)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_transposed_convolution_bounds_are_sound(kwargs, norm):
    """A transposed convolution is the adjoint of a convolution (same l2 norm, l_inf from its l1
    norm); exported SLLConv2d layers end in one."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, **kwargs).double().eval()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    assert module_bound(conv, norm, (4, 5, 4)) >= float(jacobian_norm(conv, x, norm))


def test_average_pool_bounds_are_sound_and_exact_for_global_pooling():
    for pool, shape in [(nn.AvgPool2d(3, stride=2, padding=1), (1, 7, 6)),
                        (nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=False), (1, 5, 5)),
                        (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
                        (nn.AdaptiveAvgPool2d(1), (1, 4, 4))]:  # fmt: skip
        x = torch.zeros(shape, dtype=torch.float64)
        assert float(jacobian_norm(pool, x, "l2")) <= module_bound(pool, "l2", shape)
        assert float(jacobian_norm(pool, x, "linf")) <= module_bound(pool, "linf", shape)
    assert module_bound(nn.AdaptiveAvgPool2d(1), "l2", (3, 4, 4)) == pytest.approx(0.25)


def test_activation_constants_are_the_sup_of_the_derivative():
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64, requires_grad=True)
    modules = [t() for t in ACTIVATION_CONSTANTS] + [nn.GELU(), nn.GELU("tanh"), nn.ELU(2.0),
                                                     nn.LeakyReLU(-1.5), nn.CELU(0.5),
                                                     nn.Softplus(2.0, math.inf)]  # fmt: skip
    for module in modules:
        (grad,) = torch.autograd.grad(module(x).sum(), x)
        sup = float(grad.abs().max())
        bound = module_bound(module, "l2")  # torch's own derivatives round 1/6 to float32
        assert sup <= bound * (1 + 1e-7) and bound <= sup * (1 + 1e-4), type(module).__name__
    assert GELU_LIPSCHITZ < GELU_TANH_LIPSCHITZ


def test_functional_forms_use_the_module_rules():
    class Functional(nn.Module):
        def forward(self, x):
            x = F.max_pool2d(F.elu(x, alpha=3.0), 3, stride=1)  # overlapping: sqrt(9)
            return F.avg_pool2d(torch.sigmoid(x), 2) * 2  # 1/4 * 1/2 * 2

    bound = lipcert.lipschitz_upper_bound(Functional(), (1, 8, 8))
    assert bound == pytest.approx(3.0 * 3.0 * 0.25 * 0.5 * 2, rel=1e-12)


class Unknown(nn.Module):
    def forward(self, x):
        return torch.sin(x) + 1


class Square(nn.Module):
    def forward(self, x):
        return x * x


class WholeSum(nn.Module):
    def forward(self, x):
        return x - x.mean()


class Gather(nn.Module):
    def forward(self, x):
        return x[:, [0, 0, 1]]


class PoolIndices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool1d(2, return_indices=True)

    def forward(self, x):
        return self.pool(x)[0]


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (Unknown(), r"torch\.sin"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)), "Softmax normalizes.*the batch"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "LayerNorm.*not Lipschitz"),
        (Square(), "multiplies two input-dependent"),
        (WholeSum(), "batch dimension"),
        (Gather(), "repeat entries"),
        (PoolIndices(), "return_indices"),
    ],
)
def test_operations_without_a_rule_are_refused_by_name(model, match):
    with pytest.raises(TypeError, match=match):
        lipcert.lipschitz_upper_bound(model, (2, 4))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -x


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branchy, self.out = Branchy(), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.branchy(x))


def test_untraceable_model_is_refused_with_help_and_a_rule_makes_it_a_leaf(monkeypatch):
    with pytest.raises(TypeError, match=r"cannot trace Wrapped.*register_bound_rule"):
        lipcert.lipschitz_upper_bound(Wrapped(), (3,))
    # max(L(linear), L(-x)) bounds both branches; registering it makes the module a leaf.
    monkeypatch.setitem(BOUND_RULES, Branchy,
                        lambda m, norm: max(1.0, module_bound(m.linear, norm)))  # fmt: skip
    model = Wrapped()
    bound = lipcert.lipschitz_upper_bound(model, (3,))
    expected = max(1.0, module_bound(model.branchy.linear)) * module_bound(model.out)
    assert bound == pytest.approx(expected, rel=1e-15)


class LoudConv(nn.Conv2d):
    """A Conv2d whose forward does more than Conv2d's: the Conv2d rule must not be used."""

    def forward(self, x):
        return 10 * super().forward(x)


def test_subclass_with_its_own_forward_is_traced_not_bounded_by_the_parent_rule():
    torch.manual_seed(0)
    conv = LoudConv(2, 3, 3, padding=1)
    plain = nn.Conv2d(2, 3, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    with pytest.raises(TypeError, match="overrides the forward of Conv2d"):
        module_bound(conv, "l2", (2, 5, 5))
    bound = lipcert.lipschitz_upper_bound(nn.Sequential(conv), (2, 5, 5))  # F.conv2d, then * 10
    assert bound == pytest.approx(10 * module_bound(plain, "l2", (2, 5, 5)), rel=1e-12)


def test_input_shape_mismatch_names_both_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"input_shape \(3, 9, 9\).*Linear.*\(1, 196\)"):
        lipcert.lipschitz_upper_bound(model, (3, 9, 9))


def test_in_place_update_of_a_shared_tensor_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.LeakyReLU(2.0, inplace=True)

        def forward(self, x):
            y = x * 1.0
            return self.act(y) + y  # y is overwritten: the true map is 2 * act(y)

    with pytest.raises(TypeError, match="in place"):
        lipcert.lipschitz_upper_bound(Shared(), (3,))


class PlainCNN(nn.Module):
    """Conv2d / BatchNorm / ReLU / MaxPool / Linear, written as a module (not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def test_certify_a_plain_cnn_pgd_cannot_break_its_radii():
    torch.manual_seed(0)
    model = randomize_batch_norms(PlainCNN()).eval()
    x = torch.rand(64, 1, 8, 8)
    y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % 4  # some misclassified points
    radii = certify(model, x, y)
    assert (radii[:8] <= 0).all() and (radii[8:] > 0).all()
    _, broken = pgd(model, x[8:], y[8:], radii[8:] * (1 - 1e-6), "l2", steps=50, restarts=2)
    assert not broken.any()
    summary = summarize(model, "l2", (1, 8, 8))  # the head form for the final linear layer
    assert summary.head_pair_bound is not None
    whole = lipcert.lipschitz_upper_bound(model, (1, 8, 8))
    assert whole == pytest.approx(summary.body_bound * module_bound(model.fc2), rel=1e-15)


def test_certify_bound_is_cached_per_input_shape():
    """A fully convolutional net certified at two sizes: each size gets its own bound."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2)).eval()  # fmt: skip
    small, large = summarize(model, "l2", (1, 4, 4)), summarize(model, "l2", (1, 12, 12))
    assert small.body_bound > large.body_bound  # the pool's 1 / sqrt(H W)
    for size, summary in ((4, small), (12, large), (4, small)):
        x = torch.rand(5, 1, size, size)
        y = model(x).argmax(1)
        expected = radii_from_logits(model(x).detach(), x, y, summary)
        assert torch.equal(certify(model, x, y), expected)


def _traced_nodes(gm: torch.fx.GraphModule) -> list[tuple[str, str, object, tuple]]:
    return [(n.op, n.name, n.target, tuple(a.name for a in n.all_input_nodes))
            for n in gm.graph.nodes]  # fmt: skip


def test_a_flat_sequential_is_built_as_the_tracer_builds_it():
    """The chain graph of an nn.Sequential (no tracer run) has the tracer's nodes, a module listed
    twice included (named_children lists it once), and the same bound."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), relu, nn.Flatten(),
                          nn.Linear(12, 5), relu, nn.Linear(5, 2)).eval()  # fmt: skip
    chain = graph_module.trace(model)
    tracer = graph_module._LeafTracer("l2")
    assert graph_module._chain_graph(model, tracer) is not None
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    assert _traced_nodes(chain) == _traced_nodes(traced)
    assert sum(n.target == "1" for n in chain.graph.nodes) == 2  # the shared ReLU, twice
    assert sum(n.op == "call_module" for n in chain.graph.nodes) == 6
    x = torch.randn(4, 2, 4, 4)
    assert torch.equal(chain(x), model(x))


class _Pair(nn.Module):
    """A module with a bound rule that returns two tensors."""

    def forward(self, x):
        return x, x


register_bound_rule(_Pair)(lambda module, norm: 1.0)


def test_a_chain_is_bounded_without_running_the_model_and_must_return_one_tensor(monkeypatch):
    """A chain graph calls what the Sequential calls: no trace check runs the model (the
    Sequential's own forward is never called), and its output must still be one tensor."""
    calls = []
    sequential_forward = nn.Sequential.forward

    def counted(self, x):
        calls.append(self)
        return sequential_forward(self, x)

    monkeypatch.setattr(nn.Sequential, "forward", counted)
    bound = graph_bound(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval(), (3,)).bound
    assert bound > 0 and calls == []
    with pytest.raises(TypeError, match="must return one tensor"):
        graph_bound(nn.Sequential(nn.Linear(3, 3), _Pair()).eval(), (3,))


class Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "model",
    [
        Doubled(nn.Linear(3, 3)),
        nn.Sequential(nn.Sequential(nn.Linear(3, 3)), nn.ReLU()),
        nn.Sequential(),
    ],
)
def test_other_roots_are_traced(model):
    """A subclass (its own forward), a nested container and an empty Sequential go through
    the tracer."""
    assert graph_module._chain_graph(model, graph_module._LeafTracer("l2")) is None


def test_a_model_that_runs_only_one_sample_at_a_time_is_checked_one_scale_at_a_time():
    """The trace check runs its three scales as one batch; a forward that fails on a batch of
    three falls back to one scale at a time, and the model is judged as before (here: its
    reshape merges the batch, refused by name)."""

    class OneAtATime(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.reshape(1, -1))

    with pytest.raises(TypeError, match="moves, splits or merges the batch dimension"):
        lipcert.lipschitz_upper_bound(OneAtATime(), (4,))


@pytest.mark.parametrize("user_setting", [True, False])
def test_the_bound_runs_the_model_once_at_zero_on_the_users_kernels(monkeypatch, user_setting):
    """One run of the graph, at x = 0, gives both the shapes and the sizes of the rounding
    allowance (no second, random probe), on the user's kernels (those of the certificate's
    forward, which the constants the rules read must come from: tests/test_review16.py); the
    user's oneDNN setting is never changed, also when the input shape does not fit."""
    calls = []
    conv2d = F.conv2d

    def recorded(x, *args, **kwargs):
        calls.append((float(x.abs().max()), torch.backends.mkldnn.enabled))
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", recorded)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", user_setting)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    bounds = graph_bound(model, (2, 5, 5))
    assert calls == [(0.0, user_setting)]
    assert bounds.zero_input_scale > 0  # the bias's size at x = 0
    assert torch.backends.mkldnn.enabled is user_setting
    with pytest.raises(ValueError, match="does not fit"):
        graph_bound(model, (4, 5, 5))
    assert torch.backends.mkldnn.enabled is user_setting
