"""Whole-network Lipschitz bounds, in l2 or l_inf.

``lipschitz_upper_bound`` composes per-module sound bounds: L(g o h) <= L(g) L(h). Each module type
has a *rule* (:data:`BOUND_RULES`, extended with :func:`register_bound_rule`) giving its operator
bound in a norm ("l2": l2 -> l2; "linf": l_inf -> l_inf); lipcert layers bring their own through
``LipschitzLayer.lipschitz_bound`` for the norm they declare. A module without a rule is refused by
name, and a rule that cannot bound a norm raises :class:`UnsupportedNorm`: nothing is ever assumed
to be 1-Lipschitz. Containers are walked as ``nn.Sequential`` chains; general graphs plug in as
another rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipcert.bounds.operator import gram_spectral_bound, rounding_safety
from lipcert.nn.constraint import LipschitzLayer

NORMS = ("l2", "linf")
BoundRule = Callable[[nn.Module, str], float]
BOUND_RULES: dict[type[nn.Module], BoundRule] = {}

#: Modules that are 1-Lipschitz in every l_p norm: coordinate-wise 1-Lipschitz maps and
#: permutations of coordinates.
ONE_LIPSCHITZ_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.PixelUnshuffle,
    nn.PixelShuffle,
    nn.Tanh,
)


class UnsupportedNorm(TypeError):
    """A module has no sound bound in the requested norm."""


def register_bound_rule(*module_types: type[nn.Module]) -> Callable[[BoundRule], BoundRule]:
    """Register ``rule(module, norm) -> float`` as the sound bound for ``module_types``."""

    def decorate(rule: BoundRule) -> BoundRule:
        for module_type in module_types:
            BOUND_RULES[module_type] = rule
        return rule

    return decorate


@register_bound_rule(*ONE_LIPSCHITZ_MODULES)
def _one(module: nn.Module, norm: str) -> float:
    return 1.0


@register_bound_rule(nn.Dropout)
def _dropout(module: nn.Module, norm: str) -> float:
    if module.training and module.p > 0:
        raise ValueError("Dropout in training mode is random: call model.eval() before bounding")
    return 1.0


def matrix_operator_bound(weight: Tensor, norm: str) -> float:
    """Sound bound of a matrix's operator norm: spectral (l2) or max absolute row sum (l_inf)."""
    weight = weight.detach().double()
    if norm == "l2":
        return float(gram_spectral_bound(weight))
    row_sums = weight.abs().sum(dim=1)
    return float(row_sums.max()) * rounding_safety(torch.float64, weight.shape[1])


@register_bound_rule(nn.Linear)
def _linear(module: nn.Module, norm: str) -> float:
    return matrix_operator_bound(module.weight, norm)


@register_bound_rule(nn.Sequential)
def _sequential(module: nn.Module, norm: str) -> float:
    bound = 1.0
    for child in module:
        bound *= module_bound(child, norm)
    return bound


def module_bound(module: nn.Module, norm: str = "l2") -> float:
    """Sound upper bound of ``module``'s Lipschitz constant in ``norm``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(module, LipschitzLayer):
        if module.lipschitz_norm not in (norm, "any"):
            raise UnsupportedNorm(
                f"{type(module).__name__} is Lipschitz in {module.lipschitz_norm}, not {norm}"
            )
        return module.lipschitz_bound()
    for module_type in type(module).__mro__:
        if module_type in BOUND_RULES:
            return BOUND_RULES[module_type](module, norm)
    raise TypeError(
        f"no Lipschitz bound rule for {type(module).__name__}; wrap it in supported modules or "
        "register one with lipcert.bounds.network.register_bound_rule"
    )


def _check_input_shape(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    except RuntimeError as err:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit {type(model).__name__}: {err}"
        ) from err


def lipschitz_upper_bound(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, norm: str = "l2"
) -> float:
    """Sound upper bound of the Lipschitz constant of ``model`` (eval mode) in ``norm``.

    ``input_shape`` (without the batch dimension) is checked against the model by one forward.
    """
    if input_shape is not None:
        _check_input_shape(model, tuple(input_shape))
    was_training = model.training
    model.eval()
    try:
        return module_bound(model, norm)
    finally:
        model.train(was_training)


def lipschitz_lower_bound(
    model: nn.Module, x: Tensor, n_power: int = 20, n_ascent: int = 20, step: float = 0.05
) -> float:
    """Empirical l2 lower bound: the largest Jacobian spectral norm found near the points ``x``.

    For each point, power iteration on J^T J (``torch.func`` jvp/vjp) finds the top singular
    direction; gradient ascent on the input then increases ||J(x) v||. Every value reported is
    ||J(x) v|| / ||v|| at a real point, so it never exceeds the true Lipschitz constant.
    """
    was_training = model.training
    model.eval()
    try:
        return max(_local_jacobian_norm(model, xi, n_power, n_ascent, step) for xi in x)
    finally:
        model.train(was_training)


def _jacobian_norm_along(model: nn.Module, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """||J(x) v|| and the next power-iteration direction J^T J v (normalized)."""

    def f(inp: Tensor) -> Tensor:
        return model(inp.unsqueeze(0)).squeeze(0)

    _, jv = torch.func.jvp(f, (x,), (v,))
    _, vjp = torch.func.vjp(f, x)
    (jtjv,) = vjp(jv)
    return jv.norm(), jtjv / jtjv.norm().clamp_min(1e-30)


def _local_jacobian_norm(
    model: nn.Module, x: Tensor, n_power: int, n_ascent: int, step: float
) -> float:
    x = x.detach().clone()
    v = torch.randn_like(x)
    v = v / v.norm()
    best = 0.0
    for _ in range(n_ascent + 1):
        for _ in range(n_power):
            norm, v = _jacobian_norm_along(model, x, v)
            best = max(best, float(norm.detach()))
        x.requires_grad_(True)
        with torch.enable_grad():
            norm, _ = _jacobian_norm_along(model, x, v.detach())
            (grad,) = torch.autograd.grad(norm, x)
        x = (x + step * grad / grad.norm().clamp_min(1e-30)).detach()
    return best
