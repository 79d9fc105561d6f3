"""Gradient-norm-preserving activations: GroupSort and MaxMin, and a string factory for configs.

GroupSort (Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation", ICML 2019)
splits the features along ``dim`` into contiguous groups of ``group_size`` and sorts each group.
Convention here: **descending** order, so ``MaxMin`` (the paper's group size 2) maps every pair
``(x_2i, x_2i+1)`` to ``(max, min)`` and ``GroupSort(2)`` is the same function as ``MaxMin()``.

On each region where the order of the inputs is fixed the map is a permutation of coordinates, so
its Jacobian is a permutation matrix (all singular values 1): it is 1-Lipschitz in every l_p norm
and preserves gradient norms (ties are broken so that the Jacobian stays a permutation).

Speed, float32 input (64, 64, 32, 32) on one CPU thread, best of 25 (forward / forward+backward):
``sort`` of the grouped view 43 / 59 ms; ``torch.maximum``/``minimum`` + stack with torch's own
backward 5 / 70 ms; ``torch.where`` swaps 20 / 67 ms; max/min with the masked backward of
:class:`_MaxMinFunction` 5 / 26 ms. Groups of 2 take that last path (and plain max/min when no
gradient is needed), since the eleventh session with both halves written in place instead of
stacked (:func:`_into_pairs`); larger groups sort the grouped view (GroupSort(4): 40 / 57 ms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipcert.nn.constraint import LipschitzLayer

#: The order GroupSort sorts each group in (descending, so groups of 2 give max then min).
SORT_DESCENDING = True


def _into_pairs(
    like: Tensor, make_first: Callable[..., Tensor], make_second: Callable[..., Tensor], dim: int
) -> Tensor:
    """A new tensor shaped like ``like`` (``(..., C/2, 2, ...)``) whose two members along
    ``dim + 1`` are ``make_first(out=...)`` and ``make_second(out=...)``, written in place: a
    stack of the two halves allocates and copies them once more (MaxMin of (64, 64, 32, 32),
    2 threads, old and new alternating: forward 2.5 against 4.0 ms, forward + backward 17
    against 22 ms). Function transforms (vmap, jacrev), forward-mode dual
    tensors, autograd and tracing have no ``out=`` forms, so there the halves are stacked; so
    they are under torch.compile and torch.export, which would record the ``out=`` ops in the
    graph (an exported program then raised once run with gradients)."""
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        out = torch.empty_like(like)
        high, low = out.unbind(dim + 1)
        try:
            make_first(out=high)
            make_second(out=low)
            return out
        except RuntimeError:  # no out= rule under this transform: the same ops, stacked
            pass
    return torch.stack((make_first(), make_second()), dim + 1)


def _maxmin_pairs(x: Tensor, dim: int) -> Tensor:
    """(max, min) of every contiguous pair along ``dim``, as a new ``(..., C/2, 2, ...)`` tensor
    (exact: no arithmetic on the values); flattening ``dim, dim + 1`` gives MaxMin's output."""
    pairs = x.unflatten(dim, (-1, 2))
    first, second = pairs.unbind(dim + 1)  # each (..., C/2, ...)
    return _into_pairs(
        pairs,
        lambda **out: torch.maximum(first, second, **out),
        lambda **out: torch.minimum(first, second, **out),
        dim,
    )


def _swap_pairs(pairs: Tensor, first_is_max: Tensor, dim: int) -> Tensor:
    """Apply MaxMin's Jacobian at the point where ``first_is_max`` was computed to ``pairs``
    (``(..., C/2, 2, ...)``, as :func:`_maxmin_pairs`).

    That Jacobian swaps exactly the pairs whose second member is the larger: a symmetric
    permutation (J = J^T), so it serves both the backward (J^T g) and forward-mode AD (J t).
    ``torch.where`` written in place (:func:`_into_pairs`): (64, 64, 32, 32), 2 threads, 10.7 ms
    against 23.9 ms for the masked products that were stacked (a mask product also turned an
    inf in the unselected member into NaN).
    """
    first, second = pairs.unbind(dim + 1)  # each (..., C/2, ...)
    return _into_pairs(
        pairs,
        lambda **out: torch.where(first_is_max, first, second, **out),
        lambda **out: torch.where(first_is_max, second, first, **out),
        dim,
    )


def _sort_groups(x: Tensor, group_size: int, dim: int) -> Tensor:
    """Sort contiguous groups of ``group_size`` along ``dim`` (any group size; sort's backward)."""
    groups = x.unflatten(dim, (-1, group_size))  # (..., C/g, g, ...)
    ordered = groups.sort(dim=dim + 1, descending=SORT_DESCENDING).values
    return ordered.flatten(dim, dim + 1)  # (..., C, ...)


class _MaxMinFunction(torch.autograd.Function):
    """MaxMin with a permutation derivative (torch's max/min backward is slow and splits ties).

    The pair mask is a second, non-differentiable output so that ``torch.func`` transforms
    (``jacrev``, ``vmap``) can use the generated vmap rule. Backward and jvp are made of
    differentiable ops, so double backward (gradient penalties) works. The output is the
    ``(..., C/2, 2, ...)`` tensor of :func:`_maxmin_pairs`, flattened by the caller: a view made
    inside a Function could not be written in place afterwards (``out += identity``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        first, second = x.unflatten(dim, (-1, 2)).unbind(dim + 1)  # each (..., C/2, ...)
        return _maxmin_pairs(x, dim), first >= second

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, int], output: tuple[Tensor, Tensor]) -> None:
        ctx.dim = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mask: Tensor) -> tuple[Tensor, None]:
        (first_is_max,) = ctx.saved_tensors
        return _swap_pairs(grad, first_is_max, ctx.dim).flatten(ctx.dim, ctx.dim + 1), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _dim_tangent: None) -> tuple[Tensor, None]:
        (first_is_max,) = ctx.saved_tensors
        return _swap_pairs(tangent.unflatten(ctx.dim, (-1, 2)), first_is_max, ctx.dim), None


#: Why GroupSort refuses the batch dimension.
_BATCH_DIM_MESSAGE = (
    "dim 0 is the batch dimension: sorting across it would mix the samples (each output would "
    "depend on other inputs, so no per-sample bound holds); use dim=1 or a feature dimension"
)


class GroupSort(LipschitzLayer, nn.Module):
    """Sort contiguous groups of ``group_size`` features along ``dim`` in descending order.

    Anil et al., ICML 2019 (GroupSort). 1-Lipschitz and gradient-norm preserving.
    ``group_size`` must divide the size of ``dim``; ``dim=1`` is the channel dimension of
    ``(B, C, H, W)`` and the feature dimension of ``(B, F)`` inputs.
    """

    #: Sorting within groups is 1-Lipschitz in every l_p norm (a per-input permutation).
    lipschitz_norm = "any"
    allocates_output = True  # a sort, or a stack of maxima and minima

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        if dim == 0:
            raise ValueError(_BATCH_DIM_MESSAGE)
        super().__init__()
        self.group_size = group_size
        self.dim = dim

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"

    def _check_input(self, x: Tensor) -> int:
        """The non-negative sort dimension of ``x``, after checking that the groups fit.

        Skipped while tracing (ONNX export): the check would be recorded as graph ops.
        """
        if torch.jit.is_tracing():
            return self.dim % x.dim()
        if not -x.dim() <= self.dim < x.dim():
            raise ValueError(f"{self}: input of shape {tuple(x.shape)} has no dimension {self.dim}")
        dim = self.dim % x.dim()
        if dim == 0:
            raise ValueError(f"{self}: on input of shape {tuple(x.shape)}, {_BATCH_DIM_MESSAGE}")
        if x.shape[dim] % self.group_size != 0:
            raise ValueError(
                f"{self}: input of shape {tuple(x.shape)} has {x.shape[dim]} features along "
                f"dim {self.dim}, not a multiple of group_size={self.group_size}"
            )
        return dim

    def forward(self, x: Tensor) -> Tensor:
        dim = self._check_input(x)
        if self.group_size == 2:
            if torch.is_grad_enabled() and x.requires_grad:
                pairs = _MaxMinFunction.apply(x, dim)[0]
            else:
                pairs = _maxmin_pairs(x, dim)
            return pairs.flatten(dim, dim + 1)
        return _sort_groups(x, self.group_size, dim)

    def lipschitz_bound(self) -> float:
        """Exactly 1: a permutation of the inputs on each region of fixed order."""
        return 1.0

    def export(self) -> GroupSort:
        """Stateless: the layer itself is its export (ONNX: TopK, or Max/Min for groups of 2)."""
        return self


class MaxMin(GroupSort):
    """``(x_2i, x_2i+1) -> (max, min)`` along ``dim``: GroupSort with groups of 2 (Anil et al.)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__(group_size=2, dim=dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


#: Activations a config may name: lipcert's gradient-norm-preserving ones and 1-Lipschitz torch
#: ones (each has a bound rule in lipcert.bounds.network).
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "groupsort": GroupSort,
    "maxmin": MaxMin,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def get_activation(name: str, **kwargs: object) -> nn.Module:
    """A new activation module from its config name, e.g. ``get_activation("groupsort",
    group_size=4)``. Case, ``_`` and ``-`` are ignored: ``"Max_Min"`` is ``"maxmin"``.
    """
    key = name.lower().replace("_", "").replace("-", "")
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key](**kwargs)
