"""In-place writes in a traced graph, accepted only where no other operation can see them.

torch.fx records an in-place operation as a node whose result aliases the tensor it writes; the
graph's data flow does not show the write, so another reader of that tensor (directly, through a
view, or under another name: Dropout and Identity in eval mode return their input) would see a
value no bound accounts for. A node *writes* a tensor when it is

* a method or function whose name ends in one underscore (``mul_``, ``torch.relu_``,
  ``copy_``), an augmented assignment (``operator.iadd``, ...), ``operator.setitem``, or an ATen
  operator whose schema writes an argument: it writes its first argument (ATen: the written ones);
* called with ``inplace=True`` (a keyword or positional argument of ``F.relu`` and the like, or the
  ``inplace`` attribute of a module such as ``nn.ReLU(inplace=True)``): its first argument;
* called with ``out=``: the ``out`` tensors.

:func:`check_in_place` checks *every* node of the graph, whether or not the output depends on it,
and accepts a write only when the tensor written is *fresh*, the result of an operation that
always allocates a new tensor (:data:`ALLOCATING_MODULES`, :data:`ALLOCATING_FUNCTIONS`, or an
accepted write to a fresh tensor), and the writing node is its only user: then nothing else can
observe the old value, and the write is just the operation applied to it (bounded by its rule).
``nn.ReLU(inplace=True)`` right after a convolution, linear layer or batch norm stays accepted;
anything else is refused with the out-of-place form suggested. (torch.fx alone traces ``x += y``
as ``x = x + y``, losing the aliasing; lipcert's tracer records ``operator.iadd``, checked here.)
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from lipcert.bounds.network import has_bound_rule

#: Augmented assignments (x += y ...), which write their left operand when it is a tensor.
AUGMENTED_ASSIGNMENTS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem,
})  # fmt: skip
#: Modules whose forward always returns a newly allocated tensor (when not ``inplace``).
ALLOCATING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU,
    nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)  # fmt: skip
#: Functions and methods that always return a newly allocated tensor (when not in place).
#: Not here: views, reshapes, casts, ``contiguous``, ``detach`` and dropout, which may return
#: their input or share its memory.
ALLOCATING_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.matmul, torch.clone, torch.cat,
    torch.concat, torch.concatenate, torch.stack, torch.sum, torch.mean, torch.amax, torch.amin,
    torch.relu, torch.sigmoid, torch.tanh, F.linear, F.conv1d, F.conv2d, F.relu, F.leaky_relu,
    F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.relu6, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.softshrink, F.sigmoid, F.tanh,
    torch.zeros, torch.ones, torch.empty, torch.full, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, "add", "sub", "mul", "div", "neg", "matmul", "clone",
    "sum", "mean", "amax", "amin", "relu", "sigmoid", "tanh", "new_zeros", "new_ones",
    "new_empty", "new_full",
})  # fmt: skip


def target_name(node: Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _call_arguments(node: Node) -> dict[str, Any]:
    """The call's arguments by parameter name, where the function has a Python signature."""
    try:
        signature = inspect.signature(node.target)
        return dict(signature.bind_partial(*node.args, **node.kwargs).arguments)
    except (TypeError, ValueError):  # builtins without a signature, or arguments that do not fit
        return dict(node.kwargs)


def _first_input(node: Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def _schema_writes(node: Node) -> list[Any] | None:
    """The arguments an ATen operator writes (from its schema); None for other targets."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not hasattr(schema, "arguments"):
        return None
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.append(node.args[i] if i < len(node.args) else node.kwargs.get(argument.name))
    return written


def written_nodes(gm: GraphModule, node: Node) -> list[Node]:
    """The nodes whose tensors ``node`` writes in place (module docstring)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        written = [_first_input(node)] if getattr(module, "inplace", False) else []
    elif node.op in ("call_function", "call_method"):
        name, arguments = target_name(node), _call_arguments(node)
        schema_writes = _schema_writes(node)
        if schema_writes is not None:
            written = schema_writes
        elif node.target in AUGMENTED_ASSIGNMENTS or (name.endswith("_") and name[-2:] != "__"):
            written = [_first_input(node)]
        else:
            written = [_first_input(node)] if arguments.get("inplace", False) is not False else []
        written.append(node.kwargs.get("out"))
    else:
        return []
    found: list[Node] = []
    map_arg(written, found.append)
    return found


def _allocates(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` (not writing in place) always returns a newly allocated tensor."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        allocating = isinstance(module, ALLOCATING_MODULES) or getattr(
            module, "allocates_output", False
        )
        return allocating and has_bound_rule(module)
    return node.op in ("call_function", "call_method") and node.target in ALLOCATING_FUNCTIONS


def check_in_place(gm: GraphModule, describe: Callable[[Node], str]) -> None:
    """TypeError unless every in-place write in ``gm`` goes to a fresh tensor that nothing else
    reads (module docstring); ``describe`` names a node's operation in the message. Static: it
    runs before the graph does, so a refused write never touches the model's tensors."""
    fresh: set[Node] = set()
    for node in gm.graph.nodes:
        written = written_nodes(gm, node)
        for target in written:
            if target not in fresh or set(target.users) != {node}:
                raise TypeError(
                    f"{describe(node)} (node '{node.name}') writes in place to the result of "
                    f"{describe(target)} (node '{target.name}'), which "
                    + ("other operations also read" if target in fresh else
                       "may share its memory with other tensors (an input, a parameter, a view, "
                       "or a module that returns its input, like Dropout or Identity in eval "
                       "mode)")
                    + ": the write is invisible to the bound. Use the out-of-place form "
                    "(inplace=False, x = x * 3 instead of x.mul_(3) or x *= 3, no out=)"
                )  # fmt: skip
        if written or _allocates(gm, node):
            fresh.add(node)
