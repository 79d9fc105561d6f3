"""The fourteenth review: soundness of the Cholesky-tested symbol maximum, float32 weights without
rescaling, the unchecked Sequential chain (and its lazily generated graph module) and the
one-reduction magnitudes. Exact oracles: positive definiteness of mu I - G in rational
arithmetic, dense Jacobians, float64 SVDs."""

from __future__ import annotations

import copy
import io
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from lipschitz import positive_definite
from torch import nn

import lipcert
from lipcert.bounds.graph import _trace, graph_bound, trace
from lipcert.bounds.network import magnitude
from lipcert.bounds.operator import eigen_spectral_bound, gram_max_eigenvalue_bound

SUBNORMAL = 2.0**-1074


def _exceeds_every_eigenvalue(bound: float, batch: torch.Tensor, unit: Fraction) -> bool:
    """Whether bound I - G is positive definite, exactly, for every G = unit * batch[b] (integer
    entries; of each lower triangle, mirrored, as LAPACK reads it). Complex H = A + iB through
    the real [[A, -B], [B, A]]."""
    level = Fraction(bound) / unit
    for g in batch:
        lower = torch.tril(g) + torch.tril(g, -1).mH
        if lower.is_complex():
            a, b = lower.real.tolist(), lower.imag.tolist()
            rows = [ra + [-x for x in rb] for ra, rb in zip(a, b, strict=True)]
            rows += [rb + ra for ra, rb in zip(a, b, strict=True)]
        else:
            rows = lower.tolist()
        shifted = [
            [(level if i == j else 0) - Fraction(x) for j, x in enumerate(row)]
            for i, row in enumerate(rows)
        ]
        if not positive_definite(shifted):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# gram_max_eigenvalue_bound: finding (underflow in the Cholesky test) and exact-oracle pins


def test_cholesky_test_covers_underflow_in_subnormal_grams():
    """Grams of integer multiples of 2^-1074: the products inside the factorization underflow,
    off by up to half a unit each, which Higham's Thm 10.3 (no underflow) does not cover. mu I - G
    indefinite by two units passed the test, and the bound came out one unit below lambda_max
    (132 against 133 units) before the n (n + 1) tiny term."""
    n, gen = 8, torch.Generator().manual_seed(1)
    unsound = []
    for _ in range(1500):
        v = torch.randint(-6, 7, (n, 1), generator=gen, dtype=torch.float64)
        lam = float(v.T @ v)
        if lam < 6:
            continue
        for gap in (2, 3):
            identities = torch.eye(n, dtype=torch.float64).expand(3, n, n) * (lam - gap)
            batch = torch.cat([(v @ v.T)[None], identities]) * SUBNORMAL
            if gram_max_eigenvalue_bound(batch) < lam * SUBNORMAL:
                unsound.append((v.flatten().tolist(), gap))
    assert unsound == []


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("exponent", [-1000, -200, 0, 200, 800])
def test_spikes_just_above_the_candidates_shift_are_bounded_exactly(complex_, exponent):
    """The candidates (largest Frobenius norms) are multiples of I at lambda = mu; rank-one
    Grams outside them reach mu + d for d = 0..3 units (integer entries, times 2^exponent,
    exact): the Frobenius ranking misleads, and the Cholesky test sits at the threshold. Every
    G must be below the bound, checked in rational arithmetic."""
    n, gen = 9, torch.Generator().manual_seed(exponent + 2000 * complex_)
    dtype = torch.complex128 if complex_ else torch.float64
    unit = Fraction(2) ** exponent
    for _ in range(4):
        v = torch.randint(-5, 6, (n, 1), generator=gen).to(dtype)
        if complex_:
            v = v + 1j * torch.randint(-5, 6, (n, 1), generator=gen).to(dtype)
        lam = float((v.mH @ v).real)
        if lam < 8:
            continue
        spikes = [v @ v.mH + d * torch.eye(n, dtype=dtype) for d in (0, 1, 2, 3)]
        flat = torch.eye(n, dtype=dtype).expand(3, n, n) * (lam + 1)
        batch = torch.cat([flat, torch.stack(spikes)]) * 2.0**exponent
        assert float(torch.linalg.matrix_norm(spikes[-1])) < float(
            torch.linalg.matrix_norm(flat[0])
        )
        bound = gram_max_eigenvalue_bound(batch)
        assert _exceeds_every_eigenvalue(bound, batch / 2.0**exponent, unit)
        assert bound <= (lam + 3) * 2.0**exponent * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_negative_shift_and_indefinite_integer_batches(seed):
    """Negative definite batches (shift mu < 0: H = mu I - G has a positive diagonal) and
    indefinite ones, integer entries: the exact oracle, and within 1e-9 of the largest."""
    n, gen = 10, torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (12, n, n), generator=gen, dtype=torch.float64)
    psd = a.mT @ a
    for batch in (-psd - 3 * torch.eye(n, dtype=torch.float64), a + a.mT):
        bound = gram_max_eigenvalue_bound(batch)
        exact = float(torch.linalg.eigvalsh(batch)[..., -1].max())
        assert _exceeds_every_eigenvalue(bound, batch, Fraction(1))
        assert bound <= exact + 1e-9 * abs(exact)


def test_only_the_lower_triangles_are_read_by_both_tests():
    """A computed Gram need not be symmetric: LAPACK's eigenvalues and Cholesky both read the
    lower triangle, so garbage above the diagonal changes nothing."""
    n, gen = 12, torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (6, n, n), generator=gen, dtype=torch.float64)
    gram = a.mT @ a
    garbage = gram + torch.triu(torch.randint(-500, 500, (6, n, n), generator=gen), 1).double()
    bound = gram_max_eigenvalue_bound(garbage)
    exact = float(torch.linalg.eigvalsh(gram)[..., -1].max())
    assert _exceeds_every_eigenvalue(bound, gram, Fraction(1))
    assert bound <= exact * (1 + 1e-9)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_identical_rank_deficient_matrices(rank):
    """Identical low-rank (or zero) Grams: every Cholesky test of mu I - G sees eigenvalues at
    mu - lambda_max = ~0 and the zero eigenvalues at mu."""
    n, gen = 16, torch.Generator().manual_seed(rank)
    a = torch.randint(-3, 4, (rank, n), generator=gen, dtype=torch.float64)
    batch = (a.T @ a).expand(7, n, n)
    bound = gram_max_eigenvalue_bound(batch)
    exact = float(torch.linalg.eigvalsh(batch[0])[-1])
    assert _exceeds_every_eigenvalue(bound, batch, Fraction(1))
    assert bound <= exact * (1 + 1e-9) + 1e-300


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 / float32 / complex weights without rescaling, through the public API


def _dense_norm(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Exact operator norm of an affine module from its float64 Jacobian (widening is exact)."""
    double = copy.deepcopy(module).double()
    zero = torch.zeros(input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: double(x[None])[0], zero)
    return float(torch.linalg.svdvals(jac.reshape(-1, zero.numel()))[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, "max", "tiny"])
def test_half_and_float32_linear_layers_are_bounded_as_their_exact_weights(dtype, scale):
    """No rescaling for these dtypes: their largest values square without overflow in float64
    and their smallest subnormals without underflow. Each layer's factor against the float64
    SVD of its exact weight (within 1e-9)."""
    info = torch.finfo(dtype)
    size = {1.0: 1.0, "max": info.max / 8, "tiny": info.tiny * info.eps * 64}[scale]
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(9, 7, bias=False), nn.ReLU(), nn.Linear(7, 5, bias=False))
    for layer in (model[0], model[2]):
        w = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
        layer.weight.data = (w / w.abs().max() * size).to(dtype)
    model = model.to(dtype).eval()
    nodes = {n.name: n.factor for n in graph_bound(model, (9,)).nodes}
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight.detach().double()
        exact = float(torch.linalg.svdvals(weight / size)[0]) * size
        assert exact <= nodes[name] <= exact * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_conv_bound_against_the_dense_jacobian(dtype, padding_mode):
    """Conv2d weights of each dtype: the symbols' largest sigma_1 by the Cholesky test, against
    the dense convolution matrix's norm (float64 Jacobian); exact up to 1e-9 when circular."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).to(dtype).eval()
    shape = (3, 6, 6)
    bound = lipcert.lipschitz_upper_bound(conv, shape)
    exact = _dense_norm(conv, shape)
    assert exact <= bound
    if padding_mode == "circular":
        assert bound <= exact * (1 + 1e-9)


def test_complex_weights_are_bounded_with_their_imaginary_parts():
    """complex32 / complex64 go to complex128 unscaled: the bound of x @ W for a complex W
    (a constant of the graph) against the exact SVD."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, dtype=torch.complex64, generator=gen)
    for matrix in (w, w.to(torch.complex32), w * 2.0**120, w * 2.0**-140):
        exact = float(torch.linalg.svdvals(matrix.to(torch.complex128) / 2.0**-140)[0]) * 2.0**-140
        assert exact <= float(eigen_spectral_bound(matrix)) <= exact * (1 + 1e-9) + 1e-300


# ---------------------------------------------------------------------------------------------
# The chain without a trace check: finding (_compiled_call_impl), pins for the cases it covers


def test_a_foreign_compiled_call_on_the_sequential_is_refused():
    """``module(x)`` runs ``_compiled_call_impl`` when set, and the hook check let any function
    there pass (torch's ``compile()`` sets it). The chain, no longer checked against the model,
    bounded this 100x Sequential by its 1x chain (0.91 against 91): refused by name now, as the
    trace check refused it before today."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU()).eval()
    model._compiled_call_impl = lambda x: 100 * model._call_impl(x)
    with pytest.raises(TypeError, match="_compiled_call_impl"):
        lipcert.lipschitz_upper_bound(model, (4,))


def test_a_foreign_compiled_call_on_a_layer_is_refused():
    """The same on a layer kept whole: the trace check saw the same 100x on both sides, and the
    rule bounded the 1x weight (an unsound bound before today's changes too)."""
    layer = nn.Linear(4, 4, bias=False)
    layer._compiled_call_impl = lambda x: 100 * layer._call_impl(x)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(TypeError, match="_compiled_call_impl"):
        lipcert.lipschitz_upper_bound(model, (4,))
    with pytest.raises(TypeError, match="_compiled_call_impl"):
        lipcert.lipschitz_upper_bound(layer)


def test_module_compile_is_still_bounded():
    """``nn.Module.compile`` sets torch.compile of the module's own call: nothing changes."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    expected = lipcert.lipschitz_upper_bound(model, (4,))
    model.compile()
    assert lipcert.lipschitz_upper_bound(model, (4,)) == expected


class _Checked(nn.Sequential):
    """The same forward, but a subclass: traced by torch.fx and checked against the model."""


def _chains() -> list[nn.Sequential]:
    torch.manual_seed(11)
    shared = nn.Linear(5, 5)
    inner, outer = nn.Linear(5, 5), nn.Linear(5, 5, bias=False)
    outer.weight.data = -0.5 * inner.weight.data.T
    sll = nn.Sequential(inner, nn.ReLU(), outer)  # SLL's exported form: kept whole in l2
    conv = nn.Conv2d(2, 2, 3, padding=1)
    return [
        nn.Sequential(shared, nn.ReLU(inplace=True), shared, nn.Tanh(), shared),  # listed 3 times
        nn.Sequential(lipcert.nn.Residual(sll), inner, nn.ReLU(inplace=True)),  # also nested
        nn.Sequential(conv, nn.ReLU(inplace=True), conv, nn.Flatten(), nn.Linear(32, 3)),
        nn.Sequential(nn.Linear(5, 5), nn.LeakyReLU(0.3, inplace=True), nn.Identity(), shared),
    ]


@pytest.mark.parametrize("index", range(4))
def test_unchecked_chains_bound_what_the_checked_trace_bounds(index):
    """Repeated, nested and in-place entries: the chain graph computes the model's output, and
    its bound is the one of the checked path (a Sequential subclass) and above the Jacobian's
    norm at random points."""
    model = _chains()[index].eval()
    shape = (2, 4, 4) if index == 2 else (5,)
    x = torch.randn(4, *shape)
    assert torch.equal(trace(model)(x.clone()), model(x.clone()))
    checked = _Checked(*model)
    bound = lipcert.lipschitz_upper_bound(model, shape)
    assert bound == lipcert.lipschitz_upper_bound(checked, shape)
    double = _Checked(*copy.deepcopy(model)).double()
    for point in x.double():
        jac = torch.autograd.functional.jacobian(lambda p: double(p[None].clone())[0], point)
        assert float(torch.linalg.matrix_norm(jac.reshape(-1, point.numel()), 2)) <= bound


def test_an_in_place_write_after_a_module_returning_its_input_is_refused_in_a_chain():
    """The in-place check runs on the chain's graph as on a traced one: Identity returns its
    input, which LeakyReLU(inplace=True) would overwrite."""
    model = nn.Sequential(nn.Identity(), nn.LeakyReLU(0.3, inplace=True), nn.Linear(5, 5))
    with pytest.raises(TypeError, match="writes in place"):
        lipcert.lipschitz_upper_bound(model.eval(), (5,))


def test_trace_returns_a_scriptable_graph_module():
    """The public :func:`trace` gave the lazy graph module for a chain, which torch.jit.script
    refuses ("method cannot be used as a value"); it worked before today's change."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = trace(model)
    x = torch.randn(3, 4)
    assert torch.equal(torch.jit.script(gm)(x), model(x))
    assert "def forward" in gm.code and torch.equal(gm(x), model(x))


def test_the_chain_graph_module_runs_prints_and_pickles():
    """What graph_bound builds for a chain (lazily generated code): its forward, code, str,
    deepcopy and torch.save round trip all still work."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    gm, is_chain = _trace(model, "l2")
    assert is_chain
    assert "def forward" in str(gm) and torch.equal(copy.deepcopy(gm)(x.clone()), model(x.clone()))
    buffer = io.BytesIO()
    torch.save(_trace(model, "l2")[0], buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x.clone()), model(x.clone()))


# ---------------------------------------------------------------------------------------------
# magnitude's one-reduction path: the same value as the general path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_magnitude_of_one_tensor_is_the_general_paths(dtype):
    """One floating tensor (any layout, NaN, inf, -0, extremes) against the same tensor in a
    tuple, which takes the general path: equal (or both NaN)."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    values = []
    for size in (1.0, info.max / 4, info.tiny, info.tiny * info.eps):
        t = (base / base.abs().max() * size).to(dtype)
        values += [t, t.transpose(0, 2), t[:, ::2], t[0, 0, :1]]
    values += [
        torch.tensor([float("nan"), 1.0], dtype=dtype),
        torch.tensor([float("inf"), -1.0], dtype=dtype),
        torch.tensor(-0.0, dtype=dtype),
        torch.full((4096,), info.max, dtype=dtype),
        torch.zeros(0, dtype=dtype),
    ]
    for value in values:
        for norm in ("l2", "linf"):
            fast, general = magnitude(value, norm), magnitude((value,), norm)
            assert fast == general or (fast != fast and general != general), (value, norm)
    assert magnitude(F.relu(-torch.ones(3, dtype=dtype)), "l2") == 0.0
