"""Sound Lipschitz bounds of any PyTorch model that torch.fx can trace.

The model is traced with ``torch.fx``, keeping lipcert layers and every module with a bound rule
(:mod:`lipcert.bounds.network`, :mod:`lipcert.bounds.rules`) whole; ``nn.Sequential`` and lipcert's
``Residual`` are traced through, so their children are bounded at their own input shapes. One
forward of a random input of ``input_shape`` records every node's shape. Then every node the output
depends on gets L(node), a sound bound of the Lipschitz constant (per sample, in the chosen norm)
of the map from the model's input to that node's value, in graph order:

* the input: 1; values that do not depend on the input (parameters, constants, shapes): 0;
* a module or function of one input-dependent tensor: its own bound times L(input), since
  L(g o h) <= L(g) L(h);
* a + b, a - b: L(a) + L(b) (triangle inequality), so x + g(x) gives 1 + L(g). An operand that
  broadcasting repeats r times counts sqrt(r) times in l2 (each entry appears r times), 1 in l_inf;
* cat / stack: sqrt(sum_i L_i^2) in l2 (the pieces' squared norms add), max_i L_i in l_inf;
* c * a and a / c with a constant c: max |c| L(a) and L(a) / min |c|;
* reshapes, permutations, slicing, chunks: L unchanged (each output entry is an input entry, once);
* sum / mean of groups of n entries: sqrt(n) / (1 / sqrt(n)) in l2 (Cauchy-Schwarz), n / 1 in
  l_inf; amax / amin: 1.

Anything else raises a TypeError naming the operation: nothing is assumed to be 1-Lipschitz, and
the product of two input-dependent tensors is refused (it is not globally Lipschitz). The model
must treat the samples of a batch independently: operations over dimension 0 are refused.
The traced graph must reproduce the model's output on a random input (checked), and a module
that works in place may not overwrite a tensor that something else still reads.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node, Tracer
from torch.fx.node import map_arg

from lipcert.bounds.network import NORMS, has_bound_rule, matrix_operator_bound, module_bound
from lipcert.bounds.padded_conv import conv_geometry
from lipcert.bounds.rules import conv_bound, pad_factor
from lipcert.nn.constraint import LipschitzLayer
from lipcert.nn.residual import Residual

#: Containers traced through rather than bounded by their own rule: the trace then bounds their
#: children at their own input shapes (a convolution inside gets its size-aware bound).
TRACED_CONTAINERS = (nn.Sequential, Residual)
#: Tensor queries whose results (sizes, dtypes) do not depend on the input's values.
SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel"})
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
#: Relative tolerance of the check that the traced graph computes what the model computes.
TRACE_CHECK_RTOL = 1e-4


@dataclass(frozen=True)
class Step:
    """One operation's contribution: its own bound (None for a combination such as a + b) and
    the bound of its output with respect to the model's input."""

    factor: float | None
    bound: float


@dataclass(frozen=True)
class NodeBound:
    """A bounded operation of the traced model, for reports."""

    name: str  # module path, or the graph node's name for functions
    op: str  # module class or function name
    factor: float | None
    bound: float
    input_shape: tuple[int, ...] | None  # of its first input, without the batch dimension
    module: nn.Module | None


@dataclass(frozen=True)
class GraphBound:
    """The bound of a whole model, with the last linear layer when the model ends in one."""

    bound: float
    nodes: tuple[NodeBound, ...]
    head: nn.Linear | None  # the output is head(h) with h computed by the rest of the model
    body_bound: float | None  # the bound of h when ``head`` is set


class _LeafTracer(Tracer):
    """Keeps lipcert layers and modules with a bound rule whole (not the traced containers)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, TRACED_CONTAINERS) and not isinstance(m, LipschitzLayer):
            return False
        return has_bound_rule(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> GraphModule:
    """``model`` as a torch.fx graph with bounded modules as leaves; TypeError if untraceable."""
    tracer = _LeafTracer()
    root = nn.Sequential(model) if tracer.is_leaf_module(model, "") else model
    try:
        graph = tracer.trace(root)
    except Exception as err:  # fx fails in many ways (TraceError, TypeError, NotImplementedError)
        raise TypeError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}). To "
            "bound it, move the untraceable code (data-dependent control flow, non-torch calls) "
            "into a submodule and register a bound rule for that module with "
            "lipcert.bounds.network.register_bound_rule (modules with a rule are not traced into), "
            "or build the model from supported modules"
        ) from err
    return GraphModule(root, graph)


def _shape_of(value: Any) -> Any:
    """A tensor's shape; a list of shapes for a sequence of tensors; None otherwise."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple | list) and value and all(isinstance(v, Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def _is_shape_query(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.target is builtins.getattr:
        return node.args[1] in SHAPE_ATTRIBUTES
    return node.target is builtins.len


class _Probe(Interpreter):
    """Runs the graph once, recording shapes, which nodes depend on the input, and constants."""

    def __init__(self, gm: GraphModule, input_shape: tuple[int, ...], model_name: str) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our message names the node and the shapes
        self.input_shape, self.model_name = input_shape, model_name
        self.shapes: dict[Node, Any] = {}
        self.depends: set[Node] = set()
        self.constants: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except (RuntimeError, ValueError, IndexError) as err:
            shapes = [self.shapes.get(a) for a in n.all_input_nodes]
            raise ValueError(
                f"input_shape {self.input_shape} does not fit {self.model_name}: {_describe(n)} "
                f"failed on inputs of shape {shapes} (batch of 1): {err}"
            ) from err
        self.shapes[n] = _shape_of(result)
        if n.op == "placeholder":
            first = next(iter(self.module.graph.nodes))
            dependent = n is first
        else:
            inputs = n.all_input_nodes
            dependent = any(a in self.depends for a in inputs) and not _is_shape_query(n)
        if dependent:
            self.depends.add(n)
        else:
            self.constants[n] = result
        return result


def _describe(node: Node) -> str:
    """The operation of ``node``, for messages: a module path and type, or a function name."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return f"module '{node.target}' ({type(module).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        owner = getattr(node.target, "__module__", None)
        owner = {"_operator": "operator"}.get(owner, owner)
        name = getattr(node.target, "__name__", repr(node.target))
        return f"{owner}.{name}" if owner else name
    return f"{node.op} '{node.target}'"


@dataclass
class _Context:
    """What the rules see: the graph, its recorded shapes and constants, the bounds so far."""

    gm: GraphModule
    norm: str
    shapes: dict[Node, Any]
    constants: dict[Node, Any]
    depends: set[Node]
    bounds: dict[Node, float] = field(default_factory=dict)

    def is_dependent(self, arg: Any) -> bool:
        return isinstance(arg, Node) and arg in self.depends

    def bound(self, arg: Any) -> float:
        return self.bounds[arg] if self.is_dependent(arg) else 0.0

    def value(self, arg: Any) -> Any:
        """A constant argument's value; TypeError if it depends on the input."""
        if any(self.is_dependent(n) for n in _nodes_in(arg)):
            raise TypeError(f"an argument {arg} depends on the input where a constant is needed")
        return map_arg(arg, lambda n: self.constants[n])

    def sample_shape(self, node: Node) -> tuple[int, ...]:
        return self.shapes[node][1:]

    def spread(self, arg: Any, out: Node) -> float:
        """sqrt(r) (l2) when broadcasting repeats each entry of ``arg`` r times in ``out``."""
        if self.norm == "linf" or not self.is_dependent(arg):
            return 1.0
        return math.sqrt(math.prod(self.shapes[out]) / math.prod(self.shapes[arg]))

    def term(self, arg: Any, out: Node) -> float:
        """Contribution of ``arg`` to the bound of ``out`` in a sum (broadcast included)."""
        return self.spread(arg, out) * self.bound(arg) if self.is_dependent(arg) else 0.0


def _nodes_in(arg: Any) -> list[Node]:
    found: list[Node] = []
    map_arg(arg, found.append)
    return found


FunctionRule = Callable[[_Context, Node], Step]
#: Rules for ``call_function`` targets (callables) and ``call_method`` targets (method names).
FUNCTION_RULES: dict[Any, FunctionRule] = {}


def _rule(*targets: Any) -> Callable[[FunctionRule], FunctionRule]:
    def decorate(rule: FunctionRule) -> FunctionRule:
        for target in targets:
            FUNCTION_RULES[target] = rule
        return rule

    return decorate


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``, given at position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _unary(ctx: _Context, node: Node, factor: float) -> Step:
    """``factor`` times the bound of the node's first argument, its only input-dependent one."""
    source = node.args[0]
    others = [n for n in node.all_input_nodes if ctx.is_dependent(n) and n is not source]
    if others:
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') combines several input-dependent tensors; "
            "no rule bounds that: wrap it in a module and register a rule for it"
        )
    return Step(factor, factor * ctx.bound(source))


#: Each output entry is one input entry, used once: L unchanged in every l_p norm.
REINDEXING = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
    torch.movedim, torch.squeeze, torch.unsqueeze, torch.narrow, torch.chunk, torch.split,
    torch.unbind, torch.t, torch.clone, torch.neg, operator.neg, operator.pos, F.pixel_shuffle,
    F.pixel_unshuffle, "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "permute", "transpose", "swapaxes", "movedim", "squeeze", "unsqueeze", "contiguous", "clone",
    "t", "narrow", "chunk", "split", "unbind", "neg", "float", "double", "detach",
)  # fmt: skip


@_rule(*REINDEXING)
def _reindex(ctx: _Context, node: Node) -> Step:
    return _unary(ctx, node, 1.0)


@_rule(builtins.getattr)
def _attribute(ctx: _Context, node: Node) -> Step:
    if node.args[1] not in ("T", "mT"):
        raise TypeError(f"no Lipschitz bound rule for the tensor attribute {node.args[1]!r}")
    return _unary(ctx, node, 1.0)


@_rule(operator.getitem)
def _getitem(ctx: _Context, node: Node) -> Step:
    """One piece of a tuple, or basic indexing of a tensor (a subset of its entries, once)."""
    source, index = node.args
    if not isinstance(ctx.shapes[source], list) and not _is_basic_index(ctx, index):
        raise TypeError(
            f"indexing with {index} (node '{node.name}') may repeat entries: only ints, slices, "
            "None and ... are supported"
        )
    return _unary(ctx, node, 1.0)


def _is_basic_index(ctx: _Context, index: Any) -> bool:
    if isinstance(index, tuple):
        return all(_is_basic_index(ctx, i) for i in index)
    if isinstance(index, slice):
        bounds = (index.start, index.stop, index.step)
        return not any(ctx.is_dependent(n) for n in _nodes_in(bounds))
    if isinstance(index, Node):
        return not ctx.is_dependent(index) and isinstance(ctx.constants[index], int)
    return index is None or index is Ellipsis or isinstance(index, int)


#: Functional forms of modules with bound rules: the module and the arguments it takes.
FUNCTIONAL_MODULES: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    **dict.fromkeys((F.relu, torch.relu, "relu", F.relu_, torch.relu_, "relu_"), (nn.ReLU, ())),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, "sigmoid"), (nn.Sigmoid, ())),
    **dict.fromkeys((torch.tanh, F.tanh, "tanh"), (nn.Tanh, ())),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope",)),
    F.elu: (nn.ELU, ("alpha",)),
    F.celu: (nn.CELU, ("alpha",)),
    F.selu: (nn.SELU, ()),
    F.gelu: (nn.GELU, ("approximate",)),
    F.silu: (nn.SiLU, ()),
    F.mish: (nn.Mish, ()),
    F.hardswish: (nn.Hardswish, ()),
    F.hardsigmoid: (nn.Hardsigmoid, ()),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val")),
    F.relu6: (nn.ReLU6, ()),
    F.softplus: (nn.Softplus, ("beta", "threshold")),
    F.softsign: (nn.Softsign, ()),
    F.logsigmoid: (nn.LogSigmoid, ()),
    F.tanhshrink: (nn.Tanhshrink, ()),
    F.softshrink: (nn.Softshrink, ("lambd",)),
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
}  # fmt: skip


@_rule(*FUNCTIONAL_MODULES)
def _as_module(ctx: _Context, node: Node) -> Step:
    """The rule of the equivalent module, built from the call's arguments."""
    module_type, names = FUNCTIONAL_MODULES[node.target]
    given = dict(zip(names, node.args[1:], strict=False))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    module = module_type(**ctx.value(given)).eval()
    input_shape = ctx.sample_shape(node.args[0])
    return _unary(ctx, node, module_bound(module, ctx.norm, input_shape))


@_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
def _dropout(ctx: _Context, node: Node) -> Step:
    if ctx.value(_arg(node, 2, "training", True)):
        raise ValueError(f"{_describe(node)} with training=True is random: trace in eval mode")
    return _unary(ctx, node, 1.0)


@_rule(operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub,
       torch.sub, "sub", "sub_")  # fmt: skip
def _add(ctx: _Context, node: Node) -> Step:
    """a + alpha b (or minus): L(a) + |alpha| L(b), each with its broadcast repeats."""
    a, b = node.args[0], _arg(node, 1, "other")
    alpha = abs(ctx.value(node.kwargs.get("alpha", 1)))
    return Step(None, ctx.term(a, node) + alpha * ctx.term(b, node))


def _largest_abs(value: Any) -> float:
    return float(torch.as_tensor(value, dtype=torch.float64).abs().max())


@_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def _mul(ctx: _Context, node: Node) -> Step:
    a, b = node.args[0], _arg(node, 1, "other")
    if ctx.is_dependent(a) and ctx.is_dependent(b):
        raise TypeError(
            f"node '{node.name}' multiplies two input-dependent tensors, which is not globally "
            "Lipschitz: no sound bound exists"
        )
    source, constant = (a, b) if ctx.is_dependent(a) else (b, a)
    factor = _largest_abs(ctx.value(constant)) * ctx.spread(source, node)
    return Step(factor, factor * ctx.bound(source))


@_rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def _div(ctx: _Context, node: Node) -> Step:
    divisor = _arg(node, 1, "other")
    if ctx.is_dependent(divisor) or node.kwargs.get("rounding_mode") is not None:
        raise TypeError(
            f"node '{node.name}': only division of a tensor by a constant, without rounding, is "
            "Lipschitz"
        )
    smallest = float(torch.as_tensor(ctx.value(divisor), dtype=torch.float64).abs().min())
    if smallest == 0:
        raise TypeError(f"node '{node.name}' divides by zero")
    factor = ctx.spread(node.args[0], node) / smallest
    return _unary(ctx, node, factor)


def _dims(node: Node, dim: Any, ndim: int) -> list[int]:
    """``dim`` (an int or a sequence) as non-negative ints; TypeError if it includes the batch."""
    dims = [dim] if isinstance(dim, int) else list(dim or ())
    dims = [d % ndim for d in dims]
    if not dims or 0 in dims:
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') acts across the batch dimension: samples "
            "must be processed independently"
        )
    return dims


@_rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(ctx: _Context, node: Node) -> Step:
    """Pieces side by side: squared l2 norms add; the l_inf norm is the largest piece's."""
    _dims(node, _arg(node, 1, "dim", 0), len(ctx.shapes[node]))
    bounds = [ctx.bound(piece) for piece in _arg(node, 0, "tensors")]
    if ctx.norm == "linf":
        return Step(None, max(bounds))
    return Step(None, math.sqrt(sum(b * b for b in bounds)))


@_rule(torch.sum, "sum", torch.mean, "mean")
def _sum_or_mean(ctx: _Context, node: Node) -> Step:
    source = node.args[0]
    _dims(node, _arg(node, 1, "dim"), len(ctx.shapes[source]))
    n = math.prod(ctx.shapes[source]) / math.prod(ctx.shapes[node])  # entries per group
    mean = node.target in (torch.mean, "mean")
    if ctx.norm == "linf":
        return _unary(ctx, node, 1.0 if mean else n)
    return _unary(ctx, node, 1 / math.sqrt(n) if mean else math.sqrt(n))


@_rule(torch.amax, "amax", torch.amin, "amin")
def _extreme(ctx: _Context, node: Node) -> Step:
    """|max_g x - max_g x'| <= max_g |x - x'| <= ||(x - x')_g||: 1 in every l_p."""
    _dims(node, _arg(node, 1, "dim"), len(ctx.shapes[node.args[0]]))
    return _unary(ctx, node, 1.0)


@_rule(F.linear)
def _linear(ctx: _Context, node: Node) -> Step:
    weight = ctx.value(_arg(node, 1, "weight"))
    return _unary(ctx, node, matrix_operator_bound(weight, ctx.norm))


@_rule(operator.matmul, torch.matmul, "matmul")
def _matmul(ctx: _Context, node: Node) -> Step:
    """x @ W applies W^T to each row of x; W @ x applies W to each column (W constant, 1-2 D)."""
    a, b = node.args[0], _arg(node, 1, "other")
    if ctx.is_dependent(a) and ctx.is_dependent(b):
        raise TypeError(f"node '{node.name}' multiplies two input-dependent tensors")
    constant = torch.as_tensor(ctx.value(b if ctx.is_dependent(a) else a))
    if constant.dim() not in (1, 2):
        raise TypeError(f"node '{node.name}': matmul with a {constant.dim()}-D constant")
    matrix = constant.reshape(1, -1) if constant.dim() == 1 else constant
    matrix = matrix.T if ctx.is_dependent(a) and constant.dim() == 2 else matrix
    source = a if ctx.is_dependent(a) else b
    factor = matrix_operator_bound(matrix, ctx.norm)
    return Step(factor, factor * ctx.bound(source))


@_rule(F.conv1d, F.conv2d)
def _conv(ctx: _Context, node: Node) -> Step:
    weight = ctx.value(_arg(node, 1, "weight"))
    axes = weight.dim() - 2
    defaults = ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))
    settings = [ctx.value(_arg(node, i, name, default)) for i, name, default in defaults]
    size = ctx.sample_shape(node.args[0])[-axes:]
    geometry = conv_geometry(tuple(weight.shape[2:]), size, *settings)
    return _unary(ctx, node, conv_bound(weight, geometry, ctx.norm))


@_rule(F.pad)
def _pad(ctx: _Context, node: Node) -> Step:
    pad, mode = ctx.value(_arg(node, 1, "pad")), ctx.value(_arg(node, 2, "mode", "constant"))
    factor = pad_factor(ctx.sample_shape(node.args[0]), tuple(pad), mode, ctx.norm)
    return _unary(ctx, node, factor)


def _module_step(ctx: _Context, node: Node) -> Step:
    module = ctx.gm.get_submodule(node.target)
    if not has_bound_rule(module):
        raise TypeError(
            f"no Lipschitz bound rule for {_describe(node)}; wrap it in supported modules or "
            "register a rule with lipcert.bounds.network.register_bound_rule"
        )
    source = node.args[0]
    _check_not_in_place(node, getattr(module, "inplace", False))
    return _unary(ctx, node, module_bound(module, ctx.norm, ctx.sample_shape(source)))


def _check_not_in_place(node: Node, in_place: bool) -> None:
    """An in-place update of a tensor that other nodes read would bypass the graph's data flow."""
    source = node.args[0] if node.args else None
    if in_place and isinstance(source, Node) and len(source.users) > 1:
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') works in place on a tensor that other "
            "operations also read: use the out-of-place form"
        )


def _node_step(ctx: _Context, node: Node) -> Step:
    if node.op == "placeholder":
        return Step(None, 1.0)
    if node.op == "call_module":
        return _module_step(ctx, node)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__")  # relu_, add_, ...
    _check_not_in_place(node, in_place or bool(node.kwargs.get("inplace", False)))
    rule = FUNCTION_RULES.get(node.target)
    if rule is None or node.op not in ("call_function", "call_method"):
        raise TypeError(
            f"no Lipschitz bound rule for {_describe(node)} (node '{node.name}'); wrap it in an "
            "nn.Module and register a rule with lipcert.bounds.network.register_bound_rule"
        )
    return rule(ctx, node)


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _probe_input(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    reference = next(iter([*model.parameters(), *model.buffers()]), None)
    floating = reference is not None and reference.is_floating_point()
    dtype = reference.dtype if floating else torch.get_default_dtype()
    device = reference.device if reference is not None else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen, dtype=dtype)
    return x if device is None else x.to(device)


def _check_single_input(gm: GraphModule, name: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        raise TypeError(f"{name}.forward must take exactly one tensor to be bounded")


def _check_trace(model: nn.Module, x: Tensor, traced: Any) -> None:
    """The traced graph must compute what the model computes (in-place updates seen through other
    references, for instance, are lost by tracing)."""
    with torch.no_grad():
        expected = model(x)
    if not isinstance(traced, Tensor) or not isinstance(expected, Tensor):
        raise TypeError(f"{type(model).__name__} must return one tensor to be bounded")
    close = torch.allclose(
        traced, expected, rtol=TRACE_CHECK_RTOL, atol=TRACE_CHECK_RTOL, equal_nan=True
    )
    if not close:
        raise TypeError(
            f"the torch.fx trace of {type(model).__name__} does not reproduce its output (an "
            "in-place update seen through another reference?): it cannot be bounded soundly"
        )


def graph_bound(model: nn.Module, input_shape: tuple[int, ...], norm: str = "l2") -> GraphBound:
    """Sound bound of ``model``'s Lipschitz constant (eval mode) on inputs of ``input_shape``.

    ``input_shape`` excludes the batch dimension. TypeError when an operation has no rule or the
    model cannot be traced; ValueError when ``input_shape`` does not fit the model.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    name = type(model).__name__
    gm = trace(model)
    _check_single_input(gm, name)
    probe = _Probe(gm, tuple(input_shape), name)
    x = _probe_input(model, tuple(input_shape))
    with torch.no_grad():
        traced = probe.run(x.clone())  # in-place layers may overwrite their input
    _check_trace(model, x.clone(), traced)
    ctx = _Context(gm, norm, probe.shapes, probe.constants, probe.depends)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    needed = _ancestors(result) if isinstance(result, Node) else set()
    records = []
    for node in gm.graph.nodes:
        if node in needed and ctx.is_dependent(node):
            step = _node_step(ctx, node)
            ctx.bounds[node] = step.bound
            if node.op != "placeholder":
                records.append(_record(ctx, node, step))
    return _summary(ctx, result, tuple(records))


def _record(ctx: _Context, node: Node, step: Step) -> NodeBound:
    module = ctx.gm.get_submodule(node.target) if node.op == "call_module" else None
    first = next((a for a in node.all_input_nodes if ctx.is_dependent(a)), None)
    shape = ctx.shapes.get(first) if first is not None else None
    return NodeBound(
        node.target if module is not None else node.name,
        type(module).__name__ if module is not None else _describe(node),
        step.factor,
        step.bound,
        shape[1:] if isinstance(shape, tuple) else None,
        module,
    )


def _summary(ctx: _Context, result: Any, records: tuple[NodeBound, ...]) -> GraphBound:
    bound = ctx.bound(result)
    if result.op == "call_module":
        module = ctx.gm.get_submodule(result.target)
        source = result.args[0]
        if isinstance(module, nn.Linear) and ctx.is_dependent(source):
            return GraphBound(bound, records, module, ctx.bound(source))
    return GraphBound(bound, records, None, None)
