"""Measurement helpers for the soundness tests: exact Jacobian norms, adversarial weights."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

#: Tolerance of every "is 1-Lipschitz" check: the exact float64 Jacobian norm may exceed 1 by this.
LIPSCHITZ_TOL = 1e-6


def jacobian_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``module`` at the single input ``x`` (no batch dim), as an (out, in) matrix."""

    def f(inp: torch.Tensor) -> torch.Tensor:
        return module(inp.unsqueeze(0)).squeeze(0)

    jac = torch.func.jacrev(f)(x)
    return jac.reshape(f(x).numel(), x.numel())


def jacobian_spectral_norm(module: nn.Module, x: torch.Tensor) -> float:
    """Exact spectral norm of the Jacobian of ``module`` at the single input ``x`` (no batch dim).

    Computed with ``torch.func.jacrev`` and an SVD; use float64 modules and inputs.
    """
    return float(torch.linalg.matrix_norm(jacobian_matrix(module, x), ord=2))


def max_jacobian_norm(module: nn.Module, input_shape: tuple[int, ...], n_points: int = 3) -> float:
    """Largest exact Jacobian norm of ``module`` over a few random float64 points."""
    module = module.double()
    gen = torch.Generator().manual_seed(0)
    return max(
        jacobian_spectral_norm(module, torch.randn(input_shape, generator=gen, dtype=torch.float64))
        for _ in range(n_points)
    )


def adversarial_steps(
    module: nn.Module, input_shape: tuple[int, ...], steps: int = 3, lr: float = 10.0
) -> None:
    """A few large SGD steps that push the module's output norm up (weights go far from init)."""
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    dtype = next(module.parameters()).dtype
    for _ in range(steps):
        x = torch.randn((8, *input_shape), generator=gen, dtype=dtype)
        loss = -module(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def positive_definite(matrix: list[list[Fraction]]) -> bool:
    """Whether a symmetric matrix of exact rationals is positive definite: Gaussian elimination
    without pivoting, every pivot > 0."""
    a = [row[:] for row in matrix]
    for k in range(len(a)):
        if a[k][k] <= 0:
            return False
        for i in range(k + 1, len(a)):
            f = a[i][k] / a[k][k]
            for j in range(k + 1, len(a)):
                a[i][j] -= f * a[k][j]
    return True
