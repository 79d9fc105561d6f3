"""Review of the eleventh session's changes: AOL's Fourier row sums differentiated twice, MaxMin's
in-place halves under torch.export, and check_finite on dtypes without a norm kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipcert.bounds.graph import NO_BOUND
from lipcert.finite import check_finite
from lipcert.nn.activations import MaxMin
from lipcert.nn.aol import AOLConv2d
from lipcert.nn.correlation import abs_correlation_sums, kernel_self_correlation


def _hessian_vector_product(loss, kernel: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss(kernel), kernel, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * vector).sum(), kernel)
    return hvp


def test_a_second_derivative_of_the_row_sums_raises_instead_of_reading_zero():
    """once_differentiable only ties the gradient to the incoming gradient: with the row sums a
    plain term of the loss that is a constant, and a Hessian-vector product read their second
    derivative as 0 (15.4 off, in 25.6, for this kernel) without a word."""
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    vector = torch.randn_like(kernel)
    reference = _hessian_vector_product(
        lambda k: kernel_self_correlation(k).abs().sum() + k.pow(3).sum(), kernel, vector
    )
    assert reference.abs().max() > 1  # the second derivative of the row sums is not 0
    for loss in (
        lambda k: abs_correlation_sums(k).sum() + k.pow(3).sum(),
        lambda k: abs_correlation_sums(k).sum(),
    ):
        with pytest.raises(RuntimeError, match="differentiable once"):
            _hessian_vector_product(loss, kernel, vector)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacrev(torch.func.jacrev(lambda k: abs_correlation_sums(k).sum()))(kernel)


def test_a_parameter_gradient_penalty_through_aol_raises_the_same_error():
    """The case once_differentiable did catch (the incoming gradient depends on the kernel) now
    names the function too; an input-gradient penalty, which needs one derivative of the row
    sums, still works."""
    torch.manual_seed(0)
    layer = AOLConv2d(2, 3, 3).double().train()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    layer.zero_grad()
    layer(x).square().sum().backward(create_graph=True)
    penalty = sum(p.grad.square().sum() for p in layer.parameters())
    with pytest.raises(RuntimeError, match="differentiable once"):
        penalty.backward()


def test_first_derivatives_of_the_row_sums_are_unchanged_under_function_transforms():
    """Per-sample gradients (vmap of grad) and jacrev through the Fourier row sums, which now run
    their backward with gradients enabled, against plain autograd."""
    torch.manual_seed(0)
    layer = AOLConv2d(3, 4, 3).double().train()
    params = dict(layer.named_parameters())
    xs = torch.randn(3, 3, 6, 6, dtype=torch.float64)

    def loss(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(len(xs)):
        layer.zero_grad()
        layer(xs[i : i + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


def _maxmin_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        MaxMin(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 4),
        MaxMin(dim=-1),
    )


def test_maxmin_exports_without_out_ops_and_the_program_runs_with_gradients():
    """torch.export recorded the in-place halves as aten.maximum.out / minimum.out, so the
    exported program raised ("functions with out=... arguments don't support automatic
    differentiation") when run with gradients, e.g. for an attack on it."""
    model = _maxmin_model()
    x = torch.randn(5, 3, 5, 5, requires_grad=True)
    program = torch.export.export(model, (x.detach(),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(target.endswith(".out") for target in targets), targets
    exported = program.module()(x)
    torch.testing.assert_close(exported, model(x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(exported.sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_check_finite_reads_dtypes_without_a_norm_kernel_entry_by_entry():
    """float8_e5m2 has no CPU norm: the norm-first check raised NotImplementedError where the
    entry-wise one named the tensor holding inf."""
    inf = torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="scale holds NaN or inf values"):
        check_finite([("scale", inf)], NO_BOUND)
    check_finite([("scale", torch.ones(3).to(torch.float8_e5m2))], NO_BOUND)
