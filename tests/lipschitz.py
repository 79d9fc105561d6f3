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


#: Random points and gradient-ascent starts per soundness check, and the ascent's steps.
POINTS, STARTS, ASCENT_STEPS = 6, 2, 8


def jacobian_norm(model: nn.Module, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Exact operator norm of the Jacobian at x (float64): spectral, or largest row l1 sum."""
    jac = jacobian_matrix(model, x)
    return torch.linalg.matrix_norm(jac, ord=2) if norm == "l2" else jac.abs().sum(dim=1).max()


def worst_points(model: nn.Module, shape: tuple[int, ...], norm: str, seed: int = 0):
    """Exact Jacobian norms at random points of several scales, then along an ascent of it:
    gradient steps, or random steps kept when they help where the gradient is zero or missing
    (piecewise-linear layers; ops without second derivatives)."""
    gen = torch.Generator().manual_seed(seed)
    points = [s * torch.randn(shape, generator=gen, dtype=torch.float64)
              for s in (0.3, 1.0, 3.0) for _ in range(POINTS // 3)]  # fmt: skip
    norms = [float(jacobian_norm(model, x, norm)) for x in points]
    for x in points[:STARTS]:
        best = float(jacobian_norm(model, x, norm))
        for _ in range(ASCENT_STEPS):
            step = _ascent_direction(model, x, norm)
            if step is None:
                step = torch.randn(shape, generator=gen, dtype=torch.float64)
            candidate = x + 0.3 * step / step.norm()
            value = float(jacobian_norm(model, candidate, norm))
            norms.append(value)
            if value > best:
                x, best = candidate, value
    return norms


def _ascent_direction(model: nn.Module, x: torch.Tensor, norm: str) -> torch.Tensor | None:
    x = x.detach().requires_grad_(True)
    try:
        (grad,) = torch.autograd.grad(jacobian_norm(model, x, norm), x, allow_unused=True)
    except RuntimeError:  # an op without a second derivative
        return None
    return grad if grad is not None and bool(grad.any()) else None


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
