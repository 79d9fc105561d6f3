"""Review of the one-run probe of graph_bound (a run at x = 0 records the shapes, dtypes and
constants and the sizes of the rounding allowance; ``graph._ZeroProbe``), of its oneDNN switch
(``graph.ATEN_KERNELS``, removed) and of the process-wide switches held by a count
(``lipcert.switches.SharedSwitches``, ``lipcert.precision.ieee_float32``).

Findings (each test's docstring says on which code it fails):

* the probe ran on ATen's convolutions while the certificate's forward runs on oneDNN's: a
  constant the rules read (a scale computed from parameters by a convolution) can differ
  between the two, and a scale that cancels to 0.001 on ATen and 1.001 on oneDNN was bounded
  1000 times too small (radius 532, broken at 1.5). The switch is process-wide, so a chain's
  bound holding it did the same to another thread's bound: the bound holds no switch now;
* after ``torch.backends.disable_global_flags()`` the oneDNN switch raised a raw RuntimeError
  for every bound;
* a model that fails at x = 0 only got "input_shape does not fit" or a raw AssertionError where
  the random probe's run let the rules name the operation they refuse;
* a thread entering ``ieee_float32`` while another held it only counted, so a switch a user's
  thread turned back on in between stayed on during its certificate;
* ``ieee_float32`` left oneDNN's CPU matmul at bfloat16 after
  ``torch.set_float32_matmul_precision("medium")``.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipcert
from lipcert.bounds.graph import _Probe, _probe_input, _trace, graph_bound
from lipcert.bounds.network import BOUND_RULES
from lipcert.certify import native_summary
from lipcert.precision import ieee_float32

BIG, SMALL = 2.0**60, 2.0**35  # SMALL < ulp(BIG) / 2: BIG + SMALL - BIG is 0 or SMALL by order


def _cancelling_placement() -> tuple[int, int, int] | None:
    """Positions (p, q, r) of +BIG, -BIG and SMALL in a (1, 2, 5, 5) input whose 5 x 5
    convolution with ones sums to 0 on ATen's kernels and to SMALL on oneDNN's (their sums run
    in different orders); None where none is found (no oneDNN, or the same order)."""
    if not torch.backends.mkldnn.is_available():
        return None
    enabled = torch.backends.mkldnn.enabled
    rng, ones = random.Random(0), torch.ones(1, 2, 5, 5)
    try:
        for _ in range(400):
            p, q, r = rng.sample(range(50), 3)
            a = torch.zeros(50)
            a[p], a[q], a[r] = BIG, -BIG, SMALL
            sums = []
            for setting in (False, True):
                torch.backends.mkldnn.enabled = setting
                sums.append(float(F.conv2d(a.view(1, 2, 5, 5), ones).flatten()[0]))
            if sums == [0.0, SMALL]:
                return p, q, r
    finally:
        torch.backends.mkldnn.enabled = enabled
    return None


class ComposedScale(nn.Module):
    """head(s x), the scale s computed from parameters by a 5 x 5 convolution (as when kernels
    are composed): 1e-3 + (BIG + SMALL - BIG) / SMALL, 0.001 or 1.001 by the kernels' order."""

    def __init__(self, placement: tuple[int, int, int]) -> None:
        super().__init__()
        a = torch.zeros(50)
        a[placement[0]], a[placement[1]], a[placement[2]] = BIG, -BIG, SMALL
        self.a = nn.Parameter(a.view(1, 2, 5, 5))
        self.k = nn.Parameter(torch.ones(1, 2, 5, 5))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.conv2d(self.a, self.k).flatten()[0] / SMALL + 1e-3
        return self.head(x * scale)


def test_a_constant_computed_by_a_convolution_is_bounded_as_the_forward_computes_it(
    monkeypatch,
):
    """The rules read the probe's constants, so the probe must compute them on the kernels of
    the certificate's forward (the user's oneDNN setting, here on). On the code under review
    (probe on ATen's kernels) the scale was 0.001 in the probe and 1.001 in the forward: bound
    0.00065 for an exact 0.65, radii ~500 where -x, at distance ~2-5, changes the class. Passes
    on the old code (probe on the user's kernels)."""
    placement = _cancelling_placement()
    if placement is None:
        pytest.skip("oneDNN and ATen sum this convolution in the same order here")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    torch.manual_seed(0)
    model = ComposedScale(placement).eval()
    with torch.no_grad():
        scale = float(F.conv2d(model.a, model.k).flatten()[0] / SMALL + 1e-3)
        exact = scale * float(torch.linalg.matrix_norm(model.head.weight.double(), ord=2))
    assert scale > 1  # the forward's scale, on oneDNN
    assert graph_bound(model, (4,)).bound >= exact
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
        flipped = model(-x).argmax(1) != y
    radii = lipcert.certify(model, x, y)
    distance = (2 * x).norm(dim=1)
    assert flipped.any()
    assert (radii[flipped] < distance[flipped]).all()


def _recorded_convolutions(monkeypatch) -> list[tuple[float, bool]]:
    """(max |input|, oneDNN setting) of every F.conv2d call from now on."""
    calls: list[tuple[float, bool]] = []
    conv2d = F.conv2d

    def recorded(x, *args, **kwargs):
        calls.append((float(x.abs().max()), torch.backends.mkldnn.enabled))
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", recorded)
    return calls


class FlattenByHand(nn.Module):
    """A convolution net traced into (not a chain): x.view(x.size(0), -1) before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(75, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.head(h.view(h.size(0), -1))


@pytest.mark.parametrize("user_setting", [True, False])
def test_the_bound_runs_every_convolution_on_the_users_kernels(monkeypatch, user_setting):
    """The probe at 0 (whose constants the rules read) and the trace check of a traced graph
    run on the kernels the user's setting picks, as the certificate's forward does. Fails on
    the code under review (oneDNN switched off for both) when the user's setting is on."""
    calls = _recorded_convolutions(monkeypatch)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", user_setting)
    graph_bound(FlattenByHand().eval(), (2, 5, 5))
    assert (0.0, user_setting) in calls and len(calls) > 1  # the probe, and the trace check
    assert all(setting is user_setting for _, setting in calls)
    assert torch.backends.mkldnn.enabled is user_setting


def _frozen_flags(monkeypatch) -> None:
    """What ``torch.backends.disable_global_flags()`` does, undone after the test."""
    module_globals = torch.backends.flags_frozen.__globals__
    monkeypatch.setitem(module_globals, "__allow_nonbracketed_mutation_flag", False)
    assert torch.backends.flags_frozen()


def test_a_bound_is_computed_where_torch_refuses_to_change_its_flags(monkeypatch):
    """After ``torch.backends.disable_global_flags()`` torch refuses to set
    ``torch.backends.mkldnn.enabled``; the bound does not touch it (and certify's IEEE switches
    are not refused). Fails on the code under review (a raw RuntimeError 'not allowed to set
    torch.backends.mkldnn flags' for every bound and certificate); passes on the old code."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).eval()
    models = (chain, FlattenByHand().eval())
    expected = [graph_bound(m, (2, 5, 5)).bound for m in models]
    user = torch.backends.mkldnn.enabled
    _frozen_flags(monkeypatch)
    with pytest.raises(RuntimeError, match="not allowed"):
        torch.backends.mkldnn.enabled = not user
    assert [graph_bound(m, (2, 5, 5)).bound for m in models] == expected
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    assert lipcert.certify(chain, x, torch.zeros(4, dtype=torch.long)).shape == (4,)
    assert torch.backends.mkldnn.enabled is user


class Lambda(nn.Module):
    """``fn(self, x)`` with a linear head (4 -> 3)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.head = fn, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _inverse(m: Lambda, x: torch.Tensor) -> torch.Tensor:
    return m.head(torch.linalg.inv(x.view(-1, 2, 2)).flatten(1))


def _asserts_nonzero(m: Lambda, x: torch.Tensor) -> torch.Tensor:
    torch._assert((x != 0).all(), "inputs must be nonzero")
    return m.head(x)


@pytest.mark.parametrize(
    ("fn", "operation"), [(_inverse, "linalg_inv"), (_asserts_nonzero, "operator.ne")]
)
def test_an_operation_that_fails_at_zero_only_is_refused_by_its_rule(fn, operation):
    """A model that fails at x = 0 but not at a random input keeps the rules' TypeError naming
    the operation they refuse (the random probe let them run before). Fails on the code under
    review: 'input_shape (4,) does not fit' (the inverse's error at 0) and a raw
    AssertionError; passes on the old code."""
    with pytest.raises(TypeError, match=f"no Lipschitz bound rule for .*{operation}"):
        graph_bound(Lambda(fn).eval(), (4,))


class NonzeroOnly(nn.Module):
    """The identity on inputs without a zero entry; asserts otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(bool((x != 0).all()), "inputs must be nonzero")
        return x


def test_a_module_with_a_rule_that_fails_at_zero_gets_one_clear_error(monkeypatch):
    """A module with a registered rule that fails at x = 0 (where the rounding allowance is
    measured) but not at a random input: one ValueError naming the module and the input 0.
    Fails on the old code (a raw AssertionError from the run at x = 0, after the random probe)
    and on the code under review (a raw AssertionError from the probe)."""
    monkeypatch.setitem(BOUND_RULES, NonzeroOnly, lambda module, norm: 1.0)
    model = nn.Sequential(NonzeroOnly(), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"fails at the input 0.*module '0' \(NonzeroOnly\)"):
        graph_bound(model, (4,))
    with pytest.raises(ValueError, match="does not fit"):  # a wrong shape still says so
        graph_bound(model, (5,))


class FlagReader:
    """The TF32 switches lipcert sets, read and written by name."""

    names = (
        (torch.backends.cuda.matmul, "fp32_precision"),
        (torch.backends.cudnn.conv, "fp32_precision"),
    )

    @classmethod
    def read(cls) -> tuple[str, ...]:
        return tuple(getattr(obj, name) for obj, name in cls.names)

    @classmethod
    def write(cls, values: tuple[str, ...]) -> None:
        for (obj, name), value in zip(cls.names, values, strict=True):
            setattr(obj, name, value)


@pytest.fixture
def user_tf32():
    """The user's TF32 switches on for the test; the previous values back after."""
    before = FlagReader.read()
    FlagReader.write(("tf32", "tf32"))
    yield ("tf32", "tf32")
    FlagReader.write(before)


def test_a_thread_entering_while_tf32_is_held_off_sets_it_off_again(user_tf32):
    """Thread A holds ieee_float32; a user's thread switches TF32 back on (a training loop's
    ``torch.set_float32_matmul_precision("high")``); thread B then enters for its certificate:
    its forward must run in IEEE. Fails on the code under review (B only counted and certified
    in TF32); passes on the old code (every entry set the switches)."""
    seen = []

    def certificate() -> None:
        with ieee_float32():
            seen.append(FlagReader.read())

    with ieee_float32():
        FlagReader.write(("tf32", "tf32"))  # the user's thread, meanwhile
        thread = threading.Thread(target=certificate)
        thread.start()
        thread.join(10)
    assert seen == [("ieee", "ieee")]
    assert FlagReader.read() == user_tf32


def test_many_threads_in_ieee_float32_see_ieee_and_leave_the_users_setting(user_tf32):
    """Pins the count: 8 threads entering and leaving ieee_float32 (nested at random) always
    see IEEE inside, and the user's TF32 setting is back once all have left."""
    wrong, errors = [], []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                with ieee_float32():
                    if FlagReader.read() != ("ieee", "ieee"):
                        wrong.append(FlagReader.read())
                    if rng.random() < 0.3:
                        with ieee_float32():
                            if FlagReader.read() != ("ieee", "ieee"):
                                wrong.append(FlagReader.read())
        except Exception as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not wrong
    assert FlagReader.read() == user_tf32


ONEDNN = torch.backends.mkldnn


@pytest.mark.skipif(
    not hasattr(getattr(ONEDNN, "matmul", None), "fp32_precision"),
    reason="this torch has no oneDNN fp32_precision",
)
def test_ieee_float32_keeps_onednn_from_rounding_float32_to_bfloat16():
    """``torch.set_float32_matmul_precision("medium")`` sets oneDNN's matmul to bfloat16, which
    CPUs with AVX512-BF16 or AMX then run float32 products in (8 mantissa bits, far outside the
    float32 allowance of certify); ieee_float32 switches it and oneDNN's convolutions to IEEE
    and gives the settings back. Fails on the old code and the code under review (oneDNN's
    switches left as they were)."""
    switches = [
        *FlagReader.names,
        (ONEDNN.matmul, "fp32_precision"),
        (ONEDNN.conv, "fp32_precision"),
    ]
    before = [getattr(obj, name) for obj, name in switches]
    try:
        torch.set_float32_matmul_precision("medium")
        ONEDNN.conv.fp32_precision = "tf32"
        user = [getattr(obj, name) for obj, name in switches]
        assert user[2] == "bf16"
        with ieee_float32():
            assert [getattr(obj, name) for obj, name in switches] == ["ieee"] * 4
        assert [getattr(obj, name) for obj, name in switches] == user
    finally:
        for (obj, name), value in zip(switches, before, strict=True):
            setattr(obj, name, value)


def _shape_net() -> nn.Module:
    def fn(m: Lambda, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split(2, dim=1)
        h = torch.cat([b, a * x.shape[1]], dim=1) + m.offset.to(x.dtype)
        return m.head(h.view(h.size(0), -1)) / x.dim()

    model = Lambda(fn)
    model.register_buffer("offset", torch.arange(4.0))
    return model


def _lipcert_chain() -> nn.Module:
    from lipcert import nn as lnn

    return nn.Sequential(
        lnn.SLLConv2d(2, 4), lnn.MaxMin(), lnn.L2NormPool2d(2), nn.Flatten(), lnn.AOLLinear(8, 3)
    )


def _cnn_with_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    model[1].running_mean.uniform_(-2, 2)
    return nn.Sequential(model, nn.Flatten(), nn.Linear(48, 3))


PROBED = {
    "shape queries, split, cat, buffer": (_shape_net, (4,)),
    "lipcert chain": (_lipcert_chain, (2, 4, 4)),
    "nested cnn with batch norm": (_cnn_with_bn, (2, 4, 4)),
    "residual": (
        lambda: nn.Sequential(lipcert.nn.Residual(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 3)),
        (4,),
    ),
}


@pytest.mark.parametrize("name", list(PROBED))
def test_the_run_at_zero_records_what_a_random_probe_records(name):
    """Pins the claim of the one-run probe: shapes, dtypes, which nodes depend on the input,
    the batch-size constants and the constants themselves are the same at x = 0 as at the
    random probe the old code ran (value-dependent shapes are refused: see the next test)."""
    build, shape = PROBED[name]
    torch.manual_seed(0)
    model = build().eval()
    gm, _ = _trace(model, "l2")
    x = _probe_input(model, shape, None)
    runs = []
    for value in (x.clone(), torch.zeros_like(x)):
        probe = _Probe(gm, shape, name)
        with torch.no_grad():
            probe.run(value)
        runs.append(probe)
    random_run, zero_run = runs
    assert random_run.shapes == zero_run.shapes
    assert random_run.dtypes == zero_run.dtypes
    assert random_run.depends == zero_run.depends
    assert random_run.batch_sized == zero_run.batch_sized
    assert random_run.constants.keys() == zero_run.constants.keys()
    for node, value in random_run.constants.items():
        other = zero_run.constants[node]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


VALUE_SHAPED = {
    "nonzero": lambda m, x: m.head(x * x.nonzero().shape[0]),
    "masked_select": lambda m, x: m.head(x) + x.masked_select(x > 0).sum(),
    "unique": lambda m, x: m.head(x * torch.unique(x).numel()),
    "where with one argument": lambda m, x: m.head(x * torch.where(x)[0].shape[0]),
    "repeat_interleave": lambda m, x: m.head(
        x.repeat_interleave((x[0] > 0).long() + 1, dim=1)[:, :4]
    ),
    "sort indices": lambda m, x: m.head(x[:, x.sort(dim=1).indices[0]]),
    "topk indices": lambda m, x: m.head(x * x.topk(1).indices.float()),
    "boolean mask": lambda m, x: m.head(x[x > 0].sum() + x),
    "max_pool indices": lambda m, x: m.head(
        torch.cat([v + i for v, i in [F.max_pool1d(x, 1, return_indices=True)]], 1)
    ),
}


@pytest.mark.parametrize("name", list(VALUE_SHAPED))
def test_operations_with_value_dependent_shapes_or_indices_are_refused(name):
    """Pins that nothing whose shape or value the probe's input decides reaches a rule: each is
    refused by name, with a TypeError, at x = 0 as at the random probe before."""
    model = Lambda(VALUE_SHAPED[name]).eval()
    with pytest.raises(TypeError, match=r"no Lipschitz bound rule|indexing with|indexes the batch"):
        graph_bound(model, (4,))


class Blocking(nn.Module):
    """The identity; its first call signals ``inside`` and waits for ``done``."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.done = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inside.is_set():
            self.inside.set()
            self.done.wait(10)
        return x


def test_a_bound_in_another_thread_does_not_change_this_threads_constants(monkeypatch):
    """Thread A bounds a chain (its probe paused inside a module) while this thread bounds the
    ComposedScale model; the certificate then runs on the user's kernels. Fails on the code
    under review (A held oneDNN off process-wide, so this thread's probe computed the scale on
    ATen: radii ~1000 where -x, at distance ~2-5, changes the class), also with oneDNN switched
    off for chains only; passes on the old code."""
    placement = _cancelling_placement()
    if placement is None:
        pytest.skip("oneDNN and ATen sum this convolution in the same order here")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setitem(BOUND_RULES, Blocking, lambda module, norm: 1.0)
    blocking = Blocking()
    chain = nn.Sequential(blocking, nn.Linear(4, 3)).eval()
    thread = threading.Thread(target=graph_bound, args=(chain, (4,)))
    thread.start()
    try:
        assert blocking.inside.wait(10)
        torch.manual_seed(0)
        model = ComposedScale(placement).eval()
        summary = native_summary(model, "l2", (4,), torch.float32)  # cached for certify
    finally:
        blocking.done.set()
        thread.join(10)
    assert summary.body_bound > 1
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
        flipped = model(-x).argmax(1) != y
    radii = lipcert.certify(model, x, y)
    assert flipped.any()
    assert (radii[flipped] < (2 * x).norm(dim=1)[flipped]).all()
