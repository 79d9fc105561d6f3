"""LinfDist and its kernels: values and gradients against the naive broadcast, valid subgradients
at ties, l_inf Lipschitz bounds (random and adversarial pairs, train and eval, finite p), mean
shift, the p schedule, export (+ ONNX), memory (no (B, M, N) tensor saved) and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import LIPSCHITZ_TOL, adversarial_steps
from torch import Tensor, nn

import lipcert
from lipcert.bounds.network import UnsupportedNorm, module_bound
from lipcert.nn.linf import LinfDist, LpSchedule, Negate, PlainLinfDist, identity_init_, set_p
from lipcert.nn.linf_kernel import COMPILE_ENV, lp_distance
from lipcert.train import set_progress

#: The p values exercised: inf, a power of two (squarings), a general p (exp/log), l1.
P_VALUES = (math.inf, 8.0, 3.5, 1.0)
#: Largest difference allowed between a model and its export (house rule).
EXPORT_TOL = 1e-5


def naive_distance(x: Tensor, w: Tensor, p: float) -> Tensor:
    diff = (x[:, None, :] - w[None]).abs()  # (B, M, N)
    return diff.amax(dim=-1) if math.isinf(p) else diff.pow(p).sum(dim=-1).pow(1.0 / p)


def _inputs(batch: int, features: int, out: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(out, features, generator=gen, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, out, generator=gen, dtype=dtype)
    return x, w, grad


def _value_and_grads(fn, x: Tensor, w: Tensor, grad: Tensor):
    out = fn(x, w)
    return (out.detach(), *torch.autograd.grad(out, (x, w), grad))


@given(
    batch=st.integers(1, 9),
    features=st.integers(1, 40),
    out=st.integers(1, 9),
    p=st.sampled_from(P_VALUES),
)
def test_values_and_gradients_match_naive(batch, features, out, p):
    """float64, random inputs (no ties almost surely): equal to autograd of the broadcast."""
    x, w, grad = _inputs(batch, features, out)
    ours = _value_and_grads(lambda x, w: lp_distance(x, w, p), x, w, grad)
    ref = _value_and_grads(lambda x, w: naive_distance(x, w, p), x, w, grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_inf_path_matches_naive(monkeypatch):
    """The compiled p = inf kernels (two-pass lane argmax, padded tiles) agree exactly."""
    monkeypatch.setenv(COMPILE_ENV, "1")
    x, w, grad = _inputs(5, 40, 7, dtype=torch.float32)  # pads rows, columns and chunks
    ours = _value_and_grads(lambda x, w: lp_distance(x, w, math.inf), x, w, grad)
    ref = _value_and_grads(lambda x, w: naive_distance(x, w, math.inf), x, w, grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # the values-only kernel
        torch.testing.assert_close(lp_distance(x, w, math.inf), ref[0], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("p", [8.0, 3.5])
def test_compiled_finite_p_matches_naive(monkeypatch, p):
    monkeypatch.setenv(COMPILE_ENV, "1")
    x, w, grad = _inputs(5, 40, 7)
    ours = _value_and_grads(lambda x, w: lp_distance(x, w, p), x, w, grad)
    ref = _value_and_grads(lambda x, w: naive_distance(x, w, p), x, w, grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [16.0, 1024.0, 700.0])
def test_large_p_does_not_underflow_in_float32(p):
    """The terms are scaled by the l_inf distance, so the largest is 1 even at p = 1024: u stays
    between ||d||_inf and N^(1/p) ||d||_inf (a looser scale would underflow every term to 0)."""
    x, w, _ = _inputs(6, 300, 5, dtype=torch.float32)
    with torch.no_grad():
        u, u_inf = lp_distance(x, w, p), lp_distance(x, w, math.inf)
    assert (u >= u_inf * (1 - 1e-6)).all() and (u <= u_inf * 300 ** (1 / p) * (1 + 1e-6)).all()
    diff = (x.double()[:, None, :] - w.double()[None]).abs()  # (B, M, N), scaled in float64
    top = diff.amax(dim=-1, keepdim=True)
    reference = top[..., 0] * (diff / top).pow(p).sum(dim=-1).pow(1 / p)
    torch.testing.assert_close(u, reference.float())


def _tied_inputs() -> tuple[Tensor, Tensor]:
    """|x - w| = (1, 0.5, 1, 0.25): coordinates 0 and 2 tie for the maximum, with signs + and -."""
    x = torch.tensor([[1.0, 0.5, -1.0, 0.25]], dtype=torch.float64, requires_grad=True)
    w = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    return x, w


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_tie_gradient_is_a_valid_subgradient(monkeypatch, compiled):
    """At a tie the gradient is a vertex sign(d_n) e_n of the subdifferential conv{sign e_n}: l1
    norm 1, and u(x + v) >= u(x) + g . v for every v (u is convex in x). torch.cdist instead
    gives both tied coordinates the full sign (l1 norm 2), which is no subgradient."""
    monkeypatch.setenv(COMPILE_ENV, compiled)
    x, w = _tied_inputs()
    (grad_x,) = torch.autograd.grad(lp_distance(x, w, math.inf).sum(), x)
    assert grad_x.abs().sum() == 1
    tied = {(0, 1.0), (2, -1.0)}
    n = int(grad_x.abs().argmax())
    assert (n, float(grad_x[0, n])) in tied
    gen = torch.Generator().manual_seed(0)
    u0 = float(naive_distance(x, w, math.inf).detach())
    for _ in range(200):
        v = torch.randn(1, 4, generator=gen, dtype=torch.float64)
        assert (
            float(naive_distance(x + v, w, math.inf).detach())
            >= u0 + float((grad_x * v).sum()) - 1e-12
        )
    (cdist_grad,) = torch.autograd.grad(torch.cdist(x, w, p=math.inf).sum(), x)
    assert cdist_grad.abs().sum() == 2  # the contrast the layer avoids


def _linf_ratio(layer: nn.Module, x: Tensor, x2: Tensor) -> Tensor:
    """||f(x) - f(x')||_inf / ||x - x'||_inf per sample."""
    num = (layer(x) - layer(x2)).abs().amax(dim=-1)
    return num / (x - x2).abs().amax(dim=-1)


#: l_inf distance of the searched pairs: far enough apart that float64 rounding of
#: f(x) - f(x') stays negligible next to LIPSCHITZ_TOL.
PAIR_RADIUS = 0.1


def _max_ratio(layer: nn.Module, features: int, steps: int = 30) -> float:
    """Largest ratio over random pairs x, x + r v / ||v||_inf, refined by gradient ascent on x
    and v (r = PAIR_RADIUS)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, features, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(32, features, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x, v], lr=0.05)
    best = 0.0
    for _ in range(steps):
        x2 = x + PAIR_RADIUS * v / v.abs().amax(dim=-1, keepdim=True)
        ratio = _linf_ratio(layer, x, x2)
        best = max(best, float(ratio.max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def _layer(features: int, out: int, p: float, mean_shift: bool) -> LinfDist:
    torch.manual_seed(0)
    layer = LinfDist(features, out, bias=not mean_shift, mean_shift=mean_shift, p=p).double()
    if mean_shift:
        layer.running_mean.normal_()
    return layer


@given(
    features=st.integers(1, 24),
    out=st.integers(1, 8),
    p=st.sampled_from((math.inf, 8.0, 2.0)),
    mean_shift=st.booleans(),
)
def test_eval_lipschitz_within_bound_on_adversarial_pairs(features, out, p, mean_shift):
    """Eval mode, at init and after large steps: ratio <= lipschitz_bound() (1 at p = inf,
    features^(1/p) at finite p), on random and adversarially searched pairs."""
    layer = _layer(features, out, p, mean_shift)
    for stage in ("init", "trained"):
        if stage == "trained":
            layer.train()
            adversarial_steps(layer, (features,))
        layer.eval()
        bound = layer.lipschitz_bound()
        assert bound == (1.0 if math.isinf(p) else pytest.approx(features ** (1 / p)))
        assert _max_ratio(layer, features) <= bound * (1 + LIPSCHITZ_TOL)


def test_finite_p_bound_is_attained():
    """All coordinates moving together change ||x - w||_p by N^(1/p) ||delta||_inf: the finite-p
    bound cannot be lowered (so certifying before p = inf must use it)."""
    features, p = 64, 8.0
    layer = LinfDist(features, 1, p=p).double()
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.ones(1, features, dtype=torch.float64)
    ratio = float(_linf_ratio(layer, x, x + 0.01))
    assert ratio == pytest.approx(features ** (1 / p), rel=1e-9)
    assert ratio <= layer.lipschitz_bound()


@given(batch=st.integers(2, 8), features=st.integers(1, 12), p=st.sampled_from((math.inf, 8.0)))
def test_train_mode_batch_map_within_twice_the_bound(batch, features, p):
    """Training-mode mean shift: the batch map X -> U(X) - mean(U(X)) moves by at most
    2 (1 - 1/B) L ||X - X'||_inf (max over the batch); lipschitz_bound() doubles in train mode."""
    layer = _layer(features, 5, p, mean_shift=True).train()
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(50):
        x = torch.randn(batch, features, generator=gen, dtype=torch.float64)
        x2 = x + torch.randn(batch, features, generator=gen, dtype=torch.float64)
        moved = (layer(x) - layer(x2)).abs().max() / (x - x2).abs().max()
        worst = max(worst, float(moved))
    per_sample = layer.lipschitz_bound() / 2
    assert worst <= 2 * (1 - 1 / batch) * per_sample * (1 + LIPSCHITZ_TOL)
    assert layer.lipschitz_bound() == 2 * layer.eval().lipschitz_bound()


def test_mean_shift_train_and_eval():
    layer = LinfDist(6, 4, bias=False, mean_shift=True, momentum=0.5).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    out = layer(x)  # training: centered over the batch; running mean half-way to the batch mean
    torch.testing.assert_close(out.mean(0), torch.zeros(4, dtype=torch.float64))
    batch_mean = naive_distance(x, layer.weight.detach(), math.inf).mean(0)
    torch.testing.assert_close(layer.running_mean, 0.5 * batch_mean)
    layer.eval()
    expected = naive_distance(x, layer.weight.detach(), math.inf) - layer.running_mean
    torch.testing.assert_close(layer(x), expected)
    clone = LinfDist(6, 4, bias=False, mean_shift=True).double().eval()
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), layer(x))


def test_p_is_a_buffer_in_the_state_dict():
    layer = LinfDist(3, 2, p=8.0)
    state = layer.state_dict()
    assert float(state["p"]) == 8.0
    fresh = LinfDist(3, 2)
    assert math.isinf(float(fresh.p))
    fresh.load_state_dict(state)
    assert float(fresh.p) == 8.0


def test_lp_schedule():
    schedule = LpSchedule(p_start=8.0, p_end=512.0, hold=0.1, ramp_end=0.9)
    assert schedule(0.0) == schedule(0.1) == 8.0
    assert schedule(0.5) == pytest.approx(64.0)  # geometric: half-way in log scale
    assert schedule(0.9 - 1e-9) == pytest.approx(512.0)
    assert math.isinf(schedule(0.9)) and math.isinf(schedule(1.0))
    values = [schedule(t / 100) for t in range(100)]
    assert values == sorted(values)
    twos = LpSchedule(8.0, 1000.0, powers_of_two=True)
    assert {math.log2(twos(t / 100)) % 1 for t in range(95)} == {0.0}
    for bad in ({"p_start": 0.5}, {"p_end": 4.0}, {"hold": 0.5, "ramp_end": 0.4}):
        with pytest.raises(ValueError):
            LpSchedule(**bad)


def test_set_progress_and_set_p_reach_every_layer():
    schedule = LpSchedule(8.0, 64.0, hold=0.0, ramp_end=0.5)
    model = nn.Sequential(
        LinfDist(4, 4, bias=False, mean_shift=True, p_schedule=schedule),
        LinfDist(4, 2, p_schedule=schedule),
        Negate(),
    )
    set_progress(list(model.modules()), 0.25)  # what lipcert.train calls every step
    assert [float(m.p) for m in model[:2]] == pytest.approx([math.sqrt(8 * 64)] * 2)
    set_progress(list(model.modules()), 0.75)
    assert all(math.isinf(float(m.p)) for m in model[:2])
    set_p(model, 3.0)
    assert [float(m.p) for m in model[:2]] == [3.0, 3.0]


def test_identity_init():
    """Square layers start as x -> x + offset; mean shift removes the offset."""
    layer = LinfDist(8, 8, bias=False, mean_shift=True).double()
    identity_init_(layer, offset=3.0)
    x = 0.5 * torch.randn(16, 8, dtype=torch.float64).clamp(-1, 1)
    torch.testing.assert_close(layer(x), x - x.mean(0))
    with pytest.raises(ValueError, match="square"):
        identity_init_(LinfDist(8, 4))


def test_bounds_protocol():
    layer = LinfDist(5, 3).eval()
    assert module_bound(layer, "linf") == 1.0
    with pytest.raises(UnsupportedNorm):
        module_bound(layer, "l2")
    assert module_bound(Negate(), "l2") == module_bound(Negate(), "linf") == 1.0


def test_no_bmn_tensor_is_saved_for_backward():
    """Autograd keeps only x, w and (B, M) tensors, never the (B, M, N) differences."""
    batch, features, out = 16, 24, 20
    x, w, _ = _inputs(batch, features, out)
    largest = max(batch * features, out * features, batch * out)
    sizes: list[int] = []

    def pack(t: Tensor) -> Tensor:
        sizes.append(t.numel())
        return t

    for p in (math.inf, 8.0, 3.5):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp_distance(x, w, p).sum().backward()
        assert sizes and max(sizes) <= largest < batch * features * out


def _net(p: float = math.inf) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        LinfDist(12, 16, bias=False, mean_shift=True, p=p),
        LinfDist(16, 16, bias=False, mean_shift=True, p=p),
        LinfDist(16, 3, p=p),
        Negate(),
    )
    model(torch.randn(32, 3, 4))  # fill the running means
    return model.eval()


@pytest.mark.parametrize("p", [math.inf, 8.0])
def test_export_gives_plain_modules_and_equal_outputs(tmp_path, p):
    model = _net(p)
    x = torch.randn(7, 3, 4)
    plain = lipcert.export(model, onnx_path=tmp_path / "linf.onnx", input_shape=(3, 4))
    assert not any(isinstance(m, LinfDist) for m in plain.modules())
    assert all(isinstance(m, (nn.Sequential, nn.Flatten, PlainLinfDist, Negate)) for m in plain)
    assert (plain(x) - model(x)).abs().max() <= EXPORT_TOL
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(tmp_path / "linf.onnx"))
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    assert (torch.from_numpy(onnx_out) - model(x)).abs().max() <= EXPORT_TOL


@pytest.mark.parametrize("p", [math.inf, 8.0, 2.0])
@pytest.mark.parametrize("mean_shift", [False, True])
def test_the_exported_layer_keeps_the_layers_bound(p, mean_shift):
    """PlainLinfDist has the eval-mode bound of the layer it came from (l_inf only), checked on
    random and adversarially searched pairs like the layer itself."""
    layer = _layer(12, 5, p, mean_shift).eval()
    plain = layer.export()
    assert module_bound(plain, "linf") == layer.lipschitz_bound()
    with pytest.raises(UnsupportedNorm):
        module_bound(plain, "l2")
    assert _max_ratio(plain, 12) <= module_bound(plain, "linf") * (1 + LIPSCHITZ_TOL)


def test_certify_gives_the_exported_net_the_radii_of_the_original():
    """Before PlainLinfDist had a rule, certify traced into it and failed (its ONNX branch is
    control flow): an exported l_inf-distance net could not be certified at all."""
    model = _net(math.inf)
    x = torch.randn(40, 3, 4)
    y = model(x).argmax(dim=1)
    original = lipcert.certify(model, x, y, norm="linf")
    exported = lipcert.certify(lipcert.export(model), x, y, norm="linf")
    assert bool((original > 0).any())
    torch.testing.assert_close(exported, original, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [2.0, 128.0, 1000.0])
def test_export_at_a_finite_p_keeps_far_and_large_distances(tmp_path, p):
    """torch.cdist (the export's old kernel) overflowed at p = 128 and 1000 (inf outputs) and lost
    distances between points far from the origin at p = 2 (0.6 off, its x.w expansion)."""
    torch.manual_seed(0)
    model = LinfDist(16, 32, p=p).eval()
    with torch.no_grad():
        model.weight.mul_(3).add_(100.0)
    x = model.weight.detach()[torch.arange(40) % 32] + 1e-3 * torch.randn(40, 16)
    plain = lipcert.export(model, onnx_path=tmp_path / "linf.onnx", input_shape=(16,))
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        assert (plain(x) - expected).abs().max() <= EXPORT_TOL
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(tmp_path / "linf.onnx"))
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    assert (torch.from_numpy(onnx_out) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_bad_arguments_and_shapes():
    for kwargs, name in (
        ({"p": 0.5}, "p must be"),
        ({"p": -math.inf}, "p must be"),
        ({"momentum": 0.0}, "momentum"),
        ({"mean_shift": True}, "bias=True is redundant"),
    ):
        with pytest.raises(ValueError, match=name):
            LinfDist(3, 2, **kwargs)
    for args in ((0, 2), (3, -1), (2.5, 2)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            LinfDist(*args)
    with pytest.raises(ValueError, match=r"LinfDist expects input \(\*, 3\), got \(4, 5\)"):
        LinfDist(3, 2)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="p must be"):
        LinfDist(3, 2).set_p(0.9)
    with pytest.raises(ValueError, match=r"x \(B, N\) and w \(M, N\), got \(4, 3\) and \(2, 5\)"):
        lp_distance(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="p must be"):
        lp_distance(torch.randn(4, 3), torch.randn(2, 3), p=float("nan"))
