"""Per-module Lipschitz bound rules, in l2 or l_inf, and their composition.

Each module type has a *rule* (:data:`BOUND_RULES`, extended with :func:`register_bound_rule`)
giving its operator bound in a norm ("l2": l2 -> l2; "linf": l_inf -> l_inf); a rule registered
with ``shaped=True`` also receives the module's input shape (without the batch dimension) and is
preferred when that shape is known (a convolution's bound depends on the input size). lipcert
layers bring their own bound through ``LipschitzLayer.lipschitz_bound`` for the norm they
declare. A module without a rule is refused by name, and a rule that cannot bound a norm raises
:class:`UnsupportedNorm`: nothing is ever assumed to be 1-Lipschitz. A rule covers only what its
class computes, so it is not used (:func:`distrust_reason`) for a module with forward hooks or
pre-hooks (its own or global ones), a ``forward`` patched on the instance, or a subclass that
redefines a method of the class the rule belongs to (``forward``, ``_conv_forward``, ...; a
subclass of a lipcert layer outside lipcert must define its own ``lipschitz_bound`` for that).
Bounds round up: the arithmetic that combines them (:func:`mul_up`, :func:`add_up`,
:func:`sqrt_up`) checks each result in exact rational arithmetic and takes the next float up
when it fell below. :func:`module_bound`
composes ``nn.Sequential`` chains without shapes (L(g o h) <= L(g) L(h));
:func:`lipschitz_upper_bound` with an ``input_shape`` bounds any traceable model
(:mod:`lipcert.bounds.graph`). The rules for ``torch.nn`` layers live in
:mod:`lipcert.bounds.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from lipcert.bounds.operator import eigen_spectral_bound, rounding_safety
from lipcert.losses.base import check_count, check_hyperparameter
from lipcert.modes import eval_mode
from lipcert.nn.constraint import LipschitzLayer
from lipcert.precision import ieee_float32

NORMS = ("l2", "linf")
BoundRule = Callable[[nn.Module, str], float]
ShapedBoundRule = Callable[[nn.Module, str, tuple[int, ...]], float]
BOUND_RULES: dict[type[nn.Module], BoundRule] = {}
#: Rules that need the module's input shape (without the batch dimension).
SHAPED_BOUND_RULES: dict[type[nn.Module], ShapedBoundRule] = {}

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


#: Size of the values a module computes inside, carried to its output (see :func:`internal_size`).
InternalSize = Callable[[nn.Module, Tensor, str], float]
INTERNAL_SIZES: dict[type[nn.Module], InternalSize] = {}


#: Growth of the values a module computes inside (see :func:`internal_growth`).
InternalGrowth = Callable[[nn.Module, str], "tuple[float, float] | None"]
INTERNAL_GROWTHS: dict[type[nn.Module], InternalGrowth] = {}
#: Largest input entry a module computes finitely from (see :func:`input_limit`).
InputLimit = Callable[[nn.Module, float], float]
INPUT_LIMITS: dict[type[nn.Module], InputLimit] = {}


class UnsupportedNorm(TypeError):
    """A module has no sound bound in the requested norm."""


def register_bound_rule(*module_types: type[nn.Module], shaped: bool = False) -> Callable:
    """Register ``rule(module, norm) -> float`` as the sound bound for ``module_types``.

    With ``shaped=True`` the rule is ``rule(module, norm, input_shape) -> float``, valid for inputs
    of that shape (without the batch dimension); it is used whenever the shape is known.
    """
    return _registrar(SHAPED_BOUND_RULES if shaped else BOUND_RULES, module_types)


def _registrar(table: dict[type[nn.Module], Callable], module_types: tuple[type, ...]) -> Callable:
    """A decorator entering its function in ``table`` for each of ``module_types``."""

    def decorate(function: Callable) -> Callable:
        for module_type in module_types:
            table[module_type] = function
        return function

    return decorate


def _registered(table: dict[type[nn.Module], Callable], module: nn.Module) -> Callable | None:
    """The function ``table`` holds for ``module``'s class or its nearest base, else None."""
    return next((table[t] for t in type(module).__mro__ if t in table), None)


def register_internal_size(*module_types: type[nn.Module]) -> Callable:
    """Register ``size(module, input, norm) -> float`` for ``module_types`` (see
    :func:`internal_size`)."""
    return _registrar(INTERNAL_SIZES, module_types)


def internal_size(module: nn.Module, input: Tensor, norm: str) -> float:
    """A bound of ||t|| L(t -> output) over the values t that ``module`` computes on ``input``
    before its output (per sample, in ``norm``): what the float rounding of those values can move
    the output by, relative to the precision, beyond the output's own size. Modules whose inner
    values are the output's terms (a linear map plus its bias) need none (0); an SLL layer's inner
    bias that its outer map cancels, or a mean shift that cancels large distances, does: the
    rounding allowance of ``lipcert.certify`` sees only the outputs of the modules it keeps
    whole, and an inner 1e7 that cancels left float32 logits ~1 off a certified radius."""
    size = _registered(INTERNAL_SIZES, module)
    return 0.0 if size is None else size(module, input, norm)


def register_internal_growth(*module_types: type[nn.Module]) -> Callable:
    """Register ``growth(module, norm) -> (c, g) | None`` for ``module_types`` (see
    :func:`internal_growth`)."""
    return _registrar(INTERNAL_GROWTHS, module_types)


def internal_growth(module: nn.Module, norm: str) -> tuple[float, float] | None:
    """(c, g) such that every value ``module`` computes inside on an input h, partial sums
    included, is at most c + g ||h|| in absolute value (||h|| in ``norm``): what
    ``lipcert.bounds.graph.overflow_radius`` keeps below the float max, as it does a node's own
    values. None for modules whose inner values are their output's terms (a linear map, whose
    partial sums the graph checks) or nodes of the graph. Where :func:`internal_size` reads the
    inner values at x = 0 only, this bounds them at every input: an SLL layer of weight 1e18
    computed W^T x = inf from x = 3.4e20, inside a certified radius of 1e30."""
    growth = _registered(INTERNAL_GROWTHS, module)
    return None if growth is None else growth(module, norm)


def register_input_limit(*module_types: type[nn.Module]) -> Callable:
    """Register ``limit(module, ceiling) -> float`` for ``module_types`` (see
    :func:`input_limit`)."""
    return _registrar(INPUT_LIMITS, module_types)


def input_limit(module: nn.Module, ceiling: float) -> float:
    """The largest |entry| of its input below which every value ``module`` computes stays below
    ``ceiling``, for modules whose inner values grow faster than any c + g ||h||
    (:func:`internal_growth`): exp(beta x) inside ``Softplus``. inf for the others."""
    limit = _registered(INPUT_LIMITS, module)
    return math.inf if limit is None else limit(module, ceiling)


def magnitude(value: object, norm: str) -> float:
    """||value|| in ``norm`` (l2 or l_inf over all entries of a tensor or of a tuple's tensors)."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
        # one reduction, the values read exactly in float64 (~0.3 ms of a 12 ms bound)
        if norm == "linf":
            return float(value.detach().abs().max())
        return float(torch.linalg.vector_norm(value.detach(), dtype=torch.float64))
    pieces = value if isinstance(value, tuple | list) else [value]
    tensors = [t.detach().double().flatten() for t in pieces if isinstance(t, Tensor)]
    if not tensors or not sum(t.numel() for t in tensors):
        return 0.0
    flat = torch.cat(tensors)
    return float(flat.abs().max() if norm == "linf" else flat.norm())


#: Methods a subclass may redefine without changing what its parent's ``forward`` computes
#: (construction, printing, copying; ``torch.nn.utils.parametrize`` adds the copying ones).
HARMLESS_OVERRIDES = frozenset({
    "__init__", "__init_subclass__", "__repr__", "extra_repr", "reset_parameters",
    "__getstate__", "__setstate__", "__copy__", "__deepcopy__",
})  # fmt: skip


def round_up(value: float, exact: Fraction) -> float:
    """The float ``value`` computed for the real ``exact`` (by a few correctly rounded operations),
    raised to the next floats until it is not below ``exact``: an exact result stays as it is."""
    if not math.isfinite(value):
        return value
    while Fraction(value) < exact:
        value = math.nextafter(value, math.inf)
    return value


def mul_up(a: float, b: float) -> float:
    """An upper bound of a * b (a, b >= 0): the float product, rounded up if it was inexact."""
    a, b = float(a), float(b)
    product = a * b
    return round_up(product, Fraction(a) * Fraction(b)) if math.isfinite(product) else product


def add_up(a: float, b: float) -> float:
    """An upper bound of a + b: the float sum, rounded up if it was inexact."""
    a, b = float(a), float(b)
    total = a + b
    return round_up(total, Fraction(a) + Fraction(b)) if math.isfinite(total) else total


def sqrt_up(value: float | Fraction) -> float:
    """An upper bound of sqrt(value): the float square root, raised while its square (computed
    exactly) is below ``value``, so sqrt(4) stays 2 and sqrt(3) rounds up."""
    root = math.sqrt(value)
    if not math.isfinite(root):
        return root
    while Fraction(root) ** 2 < Fraction(value):
        root = math.nextafter(root, math.inf)
    return root


def _ruled_class(module: nn.Module) -> type | None:
    """The class whose bound covers ``module``: for a lipcert layer the nearest class defining
    ``lipschitz_bound``, otherwise the nearest class (in the MRO) with a registered rule."""
    if isinstance(module, LipschitzLayer):
        return next(t for t in type(module).__mro__ if "lipschitz_bound" in vars(t))
    ruled = (t for t in type(module).__mro__ if t in BOUND_RULES or t in SHAPED_BOUND_RULES)
    return next(ruled, None)


def hook_reason(module: nn.Module) -> str | None:
    """Why ``module`` may compute something other than its class's ``forward``: forward hooks or
    pre-hooks (its own or global ones) or a method (``forward``, ``_conv_forward``...) set on the
    instance; None if none of these."""
    if getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
        return "forward hooks or pre-hooks"
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global forward hooks (torch.nn.modules.module.register_module_forward_hook)"
    attributes = vars(module).items()
    patched = next((name for name, v in attributes if _shadows_a_method(module, name, v)), None)
    return None if patched is None else f"a method patched on the instance ({patched})"


def _shadows_a_method(module: nn.Module, name: str, value: object) -> bool:
    """Whether the instance attribute ``name`` replaces a method of ``module``'s class (a
    ``forward``, a ``_conv_forward``...): the class's rule would not bound what it computes. A
    module counts too: one put in the instance's ``__dict__`` (not registered) under the name
    ``forward`` is what a call runs (a 100x Linear there was bounded by the 1x one's weight).
    So does a ``_compiled_call_impl`` (what ``module(x)`` runs when set) other than the one
    ``module.compile()`` sets, torch.compile of the module's own ``_call_impl``: any function
    there replaced the whole call (a Sequential's 100x bounded as its 1x chain)."""
    if name == "_compiled_call_impl":
        return value is not None and not _compiles_own_call(module, value)
    if not callable(value):  # most attributes
        return False
    return callable(getattr(type(module), name, None))


def _compiles_own_call(module: nn.Module, value: object) -> bool:
    """Whether ``value`` is ``torch.compile(module._call_impl)`` (``nn.Module.compile``)."""
    return getattr(value, "_torchdynamo_orig_callable", None) == module._call_impl


def _redefined_method(module: nn.Module, owner: type) -> str | None:
    """'C overrides the m of B' when a class C of ``module`` before ``owner`` in its MRO redefines
    a method m of a later class B (lipcert's own classes are trusted to keep the bound of a
    lipcert layer they inherit); None if none does."""
    mro = type(module).__mro__
    for i, cls in enumerate(mro[: mro.index(owner)]):
        if issubclass(owner, LipschitzLayer) and cls.__module__.split(".")[0] == "lipcert":
            continue
        for name, value in vars(cls).items():
            method = callable(value) or isinstance(value, staticmethod | classmethod | property)
            base = next((b for b in mro[i + 1 :] if name in vars(b)), None)
            if method and base is not None and name not in HARMLESS_OVERRIDES:
                return f"{cls.__name__} overrides the {name} of {base.__name__}"
    return None


def distrust_reason(module: nn.Module) -> str | None:
    """Why the rule of ``module``'s class cannot bound ``module`` (None if it can, or if there is
    no rule at all): hooks, a patched ``forward``, or a redefined method of the rule's class."""
    owner = _ruled_class(module)
    if owner is None:
        return None
    reason = hook_reason(module)
    if reason is not None:
        return f"it has {reason}, which the rule of {owner.__name__} does not cover"
    override = _redefined_method(module, owner)
    if override is not None:
        return f"{override}, which the bound of {owner.__name__} does not cover"
    return None


def _rule_owner(module: nn.Module) -> type[nn.Module] | None:
    """The class whose rule bounds ``module``, provided ``module`` computes what that class
    computes (:func:`distrust_reason`); None otherwise."""
    owner = _ruled_class(module)
    return owner if owner is not None and distrust_reason(module) is None else None


def has_bound_rule(module: nn.Module) -> bool:
    """Whether :func:`module_bound` has a rule for ``module`` that covers what it computes."""
    return _rule_owner(module) is not None


@register_bound_rule(*ONE_LIPSCHITZ_MODULES)
def _one(module: nn.Module, norm: str) -> float:
    return 1.0


@register_bound_rule(
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout
)
def _dropout(module: nn.Module, norm: str) -> float:
    if module.training and module.p > 0:
        raise ValueError("Dropout in training mode is random: call model.eval() before bounding")
    return 1.0


def matrix_operator_bound(weight: Tensor, norm: str) -> float:
    """Sound bound of a matrix's operator norm: spectral (l2, LAPACK eigenvalues of its Gram, with
    their rounding) or max absolute row sum (l_inf)."""
    if norm == "l2":
        return float(eigen_spectral_bound(weight))
    row_sums = weight.detach().double().abs().sum(dim=1)
    return float(row_sums.max()) * rounding_safety(torch.float64, weight.shape[1])


@register_bound_rule(nn.Linear)
def _linear(module: nn.Module, norm: str) -> float:
    return matrix_operator_bound(module.weight, norm)


@register_bound_rule(nn.Sequential)
def _sequential(module: nn.Module, norm: str) -> float:
    bound = 1.0
    for child in module:
        bound = mul_up(bound, module_bound(child, norm))
    return bound


def module_bound(
    module: nn.Module, norm: str = "l2", input_shape: tuple[int, ...] | None = None
) -> float:
    """Sound upper bound of ``module``'s Lipschitz constant in ``norm``.

    ``input_shape`` (without the batch dimension), when given, selects the shaped rule if the
    module has one (tighter: a convolution's norm at that input size).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    owner, name = _rule_owner(module), type(module).__name__
    if owner is None:
        reason = distrust_reason(module)  # the parent's rule bounds the parent's forward only
        raise TypeError(
            f"no Lipschitz bound rule for {name}{f' ({reason})' if reason else ''}; pass "
            "input_shape to lipschitz_upper_bound to trace it with torch.fx, wrap it in "
            "supported modules, or register a rule with "
            "lipcert.bounds.network.register_bound_rule"
        )
    if isinstance(module, LipschitzLayer):
        if module.lipschitz_norm not in (norm, "any"):
            raise UnsupportedNorm(f"{name} is Lipschitz in {module.lipschitz_norm}, not {norm}")
        return module.lipschitz_bound()
    if input_shape is not None and owner in SHAPED_BOUND_RULES:
        return SHAPED_BOUND_RULES[owner](module, norm, tuple(input_shape))
    if owner in BOUND_RULES:
        return BOUND_RULES[owner](module, norm)
    raise TypeError(
        f"the bound of {name} depends on its input shape: use "
        "lipcert.lipschitz_upper_bound(model, input_shape)"
    )


def lipschitz_upper_bound(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, norm: str = "l2"
) -> float:
    """Sound upper bound of the Lipschitz constant of ``model`` (eval mode) in ``norm``.

    With ``input_shape`` (without the batch dimension) any model torch.fx can trace is bounded,
    with convolutions bounded at their actual input sizes (:mod:`lipcert.bounds.graph`); a size
    that is not an int >= 1, or a shape that does not fit the model, raises a ValueError naming
    it. Without it the model needs a rule of its own (``nn.Sequential`` chains, lipcert layers),
    bounded at every input size.
    """
    from lipcert.bounds.graph import graph_bound  # graph.py builds on this module

    with eval_mode(model):
        if input_shape is None:
            return module_bound(model, norm)
        return graph_bound(model, checked_input_shape(input_shape), norm).bound


def checked_input_shape(input_shape: object) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints >= 1; ValueError naming the bad size otherwise."""
    try:
        sizes = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of sizes, got {input_shape!r}") from None
    return tuple(check_count(f"input_shape[{i}]", size, 1) for i, size in enumerate(sizes))


def lipschitz_lower_bound(
    model: nn.Module, x: Tensor, n_power: int = 20, n_ascent: int = 20, step: float = 0.05
) -> float:
    """Empirical l2 lower bound: the largest Jacobian spectral norm found near the points ``x``.

    For each point, power iteration on J^T J (``torch.func`` jvp/vjp) finds the top singular
    direction; gradient ascent on the input then increases ||J(x) v||. Every value reported is
    ||J(x) v|| / ||v|| at a real point, so it never exceeds the true Lipschitz constant: the
    quotient is taken in float64 from the computed J v, and lowered by the a-priori relative
    rounding error of the forward (:func:`lipcert.certify.rounding_rel` of the least precise dtype
    among x, the outputs and the model's tensors: 2^-14 in float32, 1/2 in float16, and a
    bfloat16 model gets 0), the allowance certify makes for the logits. Computed float32 products
    overshot the exact norm by up to 1.4e-7 relative, above the sound upper bound (a linear
    layer) and above 1 (an identity). Runs in IEEE arithmetic, TF32 and autocast off
    (:func:`lipcert.precision.ieee_float32`): under a bfloat16 autocast the products overshot by
    0.2%.

    ``x`` (B, ...) is checked as :func:`lipcert.certify` checks it: a non-empty finite
    floating-point ``torch.Tensor``, run by the model as it is (never cast: a float64 x for a
    float32 model is refused by name, as certify refuses it); ``n_power`` must be an int >= 1,
    ``n_ascent`` an int >= 0, ``step`` a finite number > 0. ValueError naming the argument.
    """
    from lipcert.certify import (  # builds on bounds
        check_points,
        finite_input_norms,
        forward_dtype,
        rounding_rel,
        run_model,
    )

    check_points(x)
    finite_input_norms(x)
    check_count("n_power", n_power, 1)
    check_count("n_ascent", n_ascent, 0)
    check_hyperparameter("step", step, positive=True)
    with eval_mode(model), ieee_float32():
        outputs = run_model(model, x[:1])  # one forward: a shape or dtype the model refuses
        measured = max(_local_jacobian_norm(model, xi, n_power, n_ascent, step) for xi in x)
    return max(0.0, measured * (1 - rounding_rel(forward_dtype(model, x, outputs))))


def _jacobian_norm_along(model: nn.Module, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """||J(x) v|| / ||v|| (the norms in float64) and the next power-iteration direction
    J^T J v (normalized)."""

    def f(inp: Tensor) -> Tensor:
        return model(inp.unsqueeze(0)).squeeze(0)

    _, jv = torch.func.jvp(f, (x,), (v,))
    _, vjp = torch.func.vjp(f, x)
    (jtjv,) = vjp(jv)
    quotient = _norm64(jv) / _norm64(v)
    return quotient, jtjv / jtjv.norm().clamp_min(1e-30)


def _norm64(t: Tensor) -> Tensor:
    """||t||_2 accumulated in float64."""
    return torch.linalg.vector_norm(t, dtype=torch.float64)


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
        if not norm.requires_grad:  # the Jacobian is constant around x (linear, ReLU): no ascent
            break
        (grad,) = torch.autograd.grad(norm, x)
        x = (x + step * grad / grad.norm().clamp_min(1e-30)).detach()
    return best
