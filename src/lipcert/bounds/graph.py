"""Sound Lipschitz bounds of any PyTorch model that torch.fx can trace.

The model is traced with ``torch.fx``, keeping lipcert layers and every module with a bound rule
(:mod:`lipcert.bounds.network`, :mod:`lipcert.bounds.rules`) whole; ``nn.Sequential`` and lipcert's
``Residual`` are traced through, so their children are bounded at their own input shapes (a
``Residual`` in the form an exported SLL layer takes stays whole in l2, bounded by SLL's own
rule: :func:`lipcert.nn.residual.sll_form`). One forward of a random input of ``input_shape``
records every node's shape. Then every node the output depends on gets L(node), a sound bound of
the Lipschitz constant (per sample, in the chosen norm) of the map from the model's input to that
node's value, in graph order:

* the input: 1; values that do not depend on the input (parameters, constants, shapes): 0;
* a module or function of one input-dependent tensor: its own bound times L(input), since
  L(g o h) <= L(g) L(h);
* a + b, a - b (``torch.rsub`` too): L(a) + L(b) (triangle inequality), so x + g(x) gives
  1 + L(g). An operand that broadcasting repeats r times counts sqrt(r) times in l2 (each entry
  appears r times), 1 in l_inf;
* cat / stack: sqrt(sum_i L_i^2) in l2 (the pieces' squared norms add), max_i L_i in l_inf; so
  does the entrywise max / min of two tensors (``torch.maximum``, ``torch.max(a, b)``: each entry
  moves at most as much as one of them);
* c * a and a / c with a constant c: max |c| L(a) and L(a) / min |c|;
* reshapes, permutations, slicing, chunks: L unchanged (each output entry is an input entry, once);
* copies (``repeat``, ``tile``, ``expand``, ``expand_as``, ``repeat_interleave`` off the batch):
  sqrt(most copies of an entry) in l2, 1 in l_inf;
* sum / mean of groups of n entries: sqrt(n) / (1 / sqrt(n)) in l2 (Cauchy-Schwarz), n / 1 in
  l_inf; amax / amin and the values of ``torch.max`` / ``torch.min`` over a dim: 1 (their indices
  jump: refused where read);
* vector norms of groups of n entries (``torch.linalg.vector_norm``, ``torch.norm``,
  ``Tensor.norm``; p an integer >= 1 or +-inf): 1 in l2 for p >= 2, sqrt(n) for p = 1; n^(1/p)
  in l_inf (:func:`_vector_norm`);
* softmax / softmin 1/2, log-softmax sqrt(n) in l2 and 2 in l_inf, over groups of n entries
  (:func:`lipcert.bounds.rules.softmax_bound`), LP pools and the other functional forms of
  modules with a rule: the module's rule;
* ``F.interpolate`` (nearest, nearest-exact, (bi/tri)linear, area; not bicubic): the Schur test
  of a nonnegative matrix at the input size (:func:`lipcert.bounds.rules.interpolation_bound`);
* abs, clamp to constant bounds: 1 (|g(a) - g(b)| <= |a - b| in each entry); flip, roll of a
  sample's entries: 1 (a permutation).

Anything else raises a TypeError naming the operation: nothing is assumed to be 1-Lipschitz, and
the product of two input-dependent tensors is refused (it is not globally Lipschitz). Every node
that depends on the input is bounded, whether or not the output reads it, so no operation is
left unchecked. Also refused, because the bound could not hold for them:

* mixing the samples of a batch: every op must keep dimension 0 as the batch, untouched (no
  reduction, cat, slicing, transpose, squeeze / unsqueeze, flatten or broadcast over it, checked
  per op and on the recorded shapes); a view / reshape must ask for -1 or the batch size first,
  and so must an expand;
* constants computed from the batch size (``x.shape[0]``, ``x.numel()``, ``len(x)``): the bound
  is per sample, computed at a batch of one; only a view / reshape may take the batch size, as
  its first size (the flatten idiom ``x.view(x.size(0), -1)``);
* in-place writes that another operation could observe (:mod:`lipcert.bounds.inplace`);
* casts that change the values: ``view(dtype)`` (reinterprets bits) and casts to a type that
  cannot hold every value of the input (float64 -> float32 rounds); widening casts are exact;
* modules with hooks or a patched ``forward``, and subclasses that redefine a method of a class
  with a rule (:func:`lipcert.bounds.network.distrust_reason`).

The traced graph must reproduce the model's output on a random input (checked; a chain built
from an ``nn.Sequential`` itself calls what its forward calls, and is not). Rounding: the
rules' products, sums, quotients and square roots round up (:func:`~lipcert.bounds.network.mul_up`
and friends check each result in exact rational arithmetic), so the float bound is never below the
real one, and exact results (a chain of 1-Lipschitz ops: 1) stay exact.
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Interpreter, Node, Proxy, Tracer
from torch.fx.graph_module import _WrappedCall
from torch.fx.node import map_arg
from torch.fx.proxy import Attribute

# A graph module that generates its forward's code at its first call, not when built: the bound
# of a chain never calls it (~0.5 ms of ~12). Private to torch (2.2 and later), hence the fallback.
try:
    from torch.fx._lazy_graph_module import _LazyGraphModule as LazyGraphModule
except ImportError:
    LazyGraphModule = GraphModule

from lipcert.bounds.inplace import check_in_place, target_name
from lipcert.bounds.network import (
    NORMS,
    add_up,
    distrust_reason,
    has_bound_rule,
    hook_reason,
    input_limit,
    internal_growth,
    internal_size,
    magnitude,
    matrix_operator_bound,
    module_bound,
    mul_up,
    round_up,
    sqrt_up,
)
from lipcert.bounds.padded_conv import conv_geometry
from lipcert.bounds.rules import (
    COPYING_PADS,
    conv_bound,
    interpolation_bound,
    interpolation_root,
    output_root,
    pad_factor,
    root_up,
)
from lipcert.finite import check_finite
from lipcert.nn.constrained import ConstrainedLinear
from lipcert.nn.constraint import LipschitzLayer
from lipcert.nn.residual import Residual, sll_form

#: Containers traced through rather than bounded by their own rule: the trace then bounds their
#: children at their own input shapes (a convolution inside gets its size-aware bound).
TRACED_CONTAINERS = (nn.Sequential, Residual)
#: Modules that pad the last len(padding) / 2 dimensions of their input.
PADDING_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, *COPYING_PADS)
#: Tensor queries whose results (sizes, dtypes) do not depend on the input's values.
SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel"})
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
#: The shape queries that never read the batch size.
BATCH_FREE_QUERIES = frozenset({"dim", "ndimension", "ndim", "dtype", "device"})
#: Roundings within tiny per input entry of a p-th root of p-th powers: the power, the sum and
#: (an LP pool) the average's division (:func:`underflow_error`).
ROOT_ROUNDINGS = 3
#: Relative tolerance of the check that the traced graph computes what the model computes.
TRACE_CHECK_RTOL = 1e-4
#: Scales of the random probe at which the trace must reproduce the model: behaviour that only
#: large or negated inputs trigger (an in-place write past a threshold) shows at one of them.
TRACE_CHECK_SCALES = (1.0, 100.0, -1.0)


@dataclass(frozen=True)
class Step:
    """One operation's contribution: its own bound (None for a combination such as a + b) and
    the bound of its output with respect to the model's input."""

    factor: float | None
    bound: float
    #: p when the output is computed from sums of p-th powers of the input's entries: 1 for a
    #: sum or an average, p > 1 under a p-th root (:func:`overflow_radius`, :func:`underflow_error`)
    root: float | None = None


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
    #: max over the input-dependent operations n of ||h_n(0)|| L / L_n: how large the model's
    #: constants (biases, shifts) make the intermediate values, carried to the output
    #: (:func:`zero_input_scale`); part of the float-rounding allowance of ``lipcert.certify``.
    zero_input_scale: float = 0.0
    #: sum over the operations n of N_n ulp_min L / L_n (N_n: entries of n's output times entries
    #: of its inputs, ulp_min: the dtype's smallest subnormal): how far values in the subnormal
    #: range, resolved only to ulp_min, can move the output (:func:`underflow_error`).
    underflow_error: float = 0.0
    #: tensors the traced graph reads that are not the model's parameters or buffers (a tensor
    #: held in a list, captured by fx as a constant): a cache of the bound must watch them too.
    constants: tuple[Tensor, ...] = ()
    #: an input norm below which no value of the forward overflows (:func:`overflow_radius`):
    #: ``lipcert.certify`` keeps ||x|| + r below it.
    overflow_radius: float = math.inf


class _LeafTracer(Tracer):
    """Keeps lipcert layers and modules with a bound rule whole (not the traced containers,
    except a residual in the form an SLL layer exports, whose own l2 bound is the tighter)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.norm = norm

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, TRACED_CONTAINERS) and not isinstance(m, LipschitzLayer):
            return self.norm == "l2" and sll_form(m)
        return has_bound_rule(m) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: Node) -> Proxy:
        return _AugmentedProxy(node, self)


class _AugmentedProxy(Proxy):
    """A proxy on which ``x += y`` (and every augmented assignment) records ``operator.iadd``,
    an in-place write that :func:`~lipcert.bounds.inplace.check_in_place` sees. fx's own Proxy
    has no ``__iadd__``, so Python ran ``x = x + y``: a tensor that another name still held lost
    the write (``h = fc(x); g = h; g += bump(x); return h`` was bounded as fc alone, and
    certified at 0.141 where the class flips at 0.051). Sizes (``n = x.size(1); n //= 2``) stay
    arithmetic: an int is not written in place. An attribute (``t = h.mT; t += ...``) is one of
    these proxies too."""

    def __getattr__(self, name: str) -> Attribute:
        return _AugmentedAttribute(self, name)


class _AugmentedAttribute(Attribute, _AugmentedProxy):
    """fx's lazy attribute proxy, with the augmented assignments of :class:`_AugmentedProxy`."""


def _augmented_assignment(name: str) -> Callable[[Proxy, Any], Proxy]:
    """``Proxy.__i<name>__``: the in-place operator on a tensor, ``__<name>__`` on a size."""
    in_place, plain = getattr(operator, f"i{name}"), getattr(Proxy, f"__{name}__")

    def assign(self: Proxy, other: Any) -> Proxy:
        if _is_size_value(self.node):
            return plain(self, other)
        return self.tracer.create_proxy("call_function", in_place, (self, other), {})

    return assign


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):  # fmt: skip
    setattr(_AugmentedProxy, f"__i{_name}__", _augmented_assignment(_name))


def _is_size_value(node: Node) -> bool:
    """Whether ``node`` is a size, or Python arithmetic on sizes (never a tensor)."""
    if _is_shape_query(node):
        return True
    arithmetic = node.op == "call_function" and getattr(node.target, "__module__", None) in (
        "_operator", "operator"
    )  # fmt: skip
    inputs = node.all_input_nodes
    return arithmetic and bool(inputs) and all(_is_size_value(a) for a in inputs)


def trace(model: nn.Module, norm: str = "l2") -> GraphModule:
    """``model`` as a torch.fx graph with bounded modules as leaves (for bounds in ``norm``);
    TypeError if untraceable. ``model`` is not changed (fx would add an attribute for each tensor
    constant). A plain ``GraphModule``, its code generated (``torch.jit.script`` refuses the
    lazy one that :func:`graph_bound` uses for a chain)."""
    return _trace(model, norm, GraphModule)[0]


def _trace(
    model: nn.Module, norm: str, chain_class: type[GraphModule] = LazyGraphModule
) -> tuple[GraphModule, bool]:
    """:func:`trace`, and whether the graph is a chain of ``nn.Sequential`` entries built from
    the container itself (:func:`_chain_graph`): then it calls the modules that the Sequential's
    own forward calls, in the same order on the same values, and needs no check against the
    model's output. A chain's graph module is a ``chain_class``."""
    tracer = _LeafTracer(norm)
    root = nn.Sequential(model) if tracer.is_leaf_module(model, "") else model
    chain = _chain_graph(root, tracer)
    if chain is not None:
        return chain_class(root, chain), True
    attributes = set(vars(root))
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
    traced = GraphModule(root, graph)
    for name in set(vars(root)) - attributes:  # fx stores tensor constants on the root: the
        delattr(root, name)  # graph module has its copies; the user's model is left as it was
    return traced, False


def _chain_graph(root: nn.Module, tracer: _LeafTracer) -> Graph | None:
    """The graph of an ``nn.Sequential`` itself (not a subclass: its forward calls its modules in
    order) whose modules the tracer keeps whole, built as tracing builds it without running the
    tracer (~2 ms of a ~20 ms bound); None for any other root. Every entry of ``_modules`` is a
    call, a module listed twice included (``named_children`` would list it once), named by its
    path as the tracer names it: its first path in ``named_modules`` (a module that is also held
    inside an earlier entry is called by that inner path, as tracing calls it)."""
    entries = list(root._modules.items())
    if type(root) is not nn.Sequential or not entries:
        return None
    if not all(m is not None and tracer.is_leaf_module(m, name) for name, m in entries):
        return None
    paths: dict[int, str] = {}
    for path, module in root.named_modules():
        paths.setdefault(id(module), path)
    graph = Graph()
    value = graph.placeholder("input")
    for _, module in entries:
        value = graph.call_module(paths[id(module)], (value,))
    graph.output(value)
    return graph


def _shape_of(value: Any) -> Any:
    """A tensor's shape; a list of shapes for a sequence of tensors; None otherwise."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple | list) and value and all(isinstance(v, Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def _dtype_of(value: Any) -> torch.dtype | None:
    """A tensor's dtype, or the first one's for a sequence of tensors; None otherwise."""
    if isinstance(value, Tensor):
        return value.dtype
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0].dtype
    return None


def _is_shape_query(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.target is builtins.getattr:
        return node.args[1] in SHAPE_ATTRIBUTES
    return node.target is builtins.len


def _query_name(node: Node) -> str:
    return node.args[1] if node.target is builtins.getattr else target_name(node)


class _Probe(Interpreter):
    """Runs the graph once, recording shapes, which nodes depend on the input, and constants."""

    def __init__(self, gm: GraphModule, input_shape: tuple[int, ...], model_name: str) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our message names the node and the shapes
        self.input_shape, self.model_name = input_shape, model_name
        self.shapes: dict[Node, Any] = {}
        self.dtypes: dict[Node, torch.dtype | None] = {}
        self.depends: set[Node] = set()
        self.constants: dict[Node, Any] = {}
        self.batch_sized: set[Node] = set()  # constants that may change with the batch size

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except (RuntimeError, ValueError, IndexError) as err:
            shapes = [self.shapes.get(a) for a in n.all_input_nodes]
            raise ValueError(
                f"input_shape {self.input_shape} does not fit {self.model_name}: {_describe(n)} "
                f"failed on inputs of shape {shapes} (batch of 1): {err}"
            ) from err
        self.shapes[n], self.dtypes[n] = _shape_of(result), _dtype_of(result)
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
            if self._reads_batch_size(n):
                self.batch_sized.add(n)
        return result

    def _reads_batch_size(self, n: Node) -> bool:
        """Whether the value of the constant node ``n`` may change with the batch size."""
        if _is_shape_query(n):
            source = n.args[0]
            if _query_name(n) in BATCH_FREE_QUERIES or not isinstance(source, Node):
                return False
            if source in self.batch_sized:
                return True
            if source not in self.depends:
                return False
            dim = _arg(n, 1, "dim") if n.target == "size" else None
            dim = self.env[dim] if isinstance(dim, Node) else dim
            return dim is None or dim % len(self.shapes[source]) == 0
        source = n.args[0] if n.args else None
        size = self.env[source] if isinstance(source, Node) else None
        if n.target is operator.getitem and isinstance(size, torch.Size):  # t.shape[i]
            return source in self.batch_sized and _picks_first(self.env, n)
        return any(a in self.batch_sized for a in n.all_input_nodes)


class _ZeroProbe(_Probe):
    """The probe of :func:`graph_bound`, run at x = 0. What :class:`_Probe` records does not
    depend on the input's values (shapes, dtypes, which nodes depend on the input, the constants),
    so the same run also keeps, for :func:`zero_input_scale`, the norm of every node's value or,
    for a module kept whole, the larger of that and the size of what it computes inside
    (:func:`internal_size`): one run of the graph where a random probe and a run at x = 0 took
    two (~1 ms of the LMT CNN's ~11 ms bound)."""

    def __init__(
        self, gm: GraphModule, input_shape: tuple[int, ...], model_name: str, norm: str
    ) -> None:
        super().__init__(gm, input_shape, model_name)
        self.norm = norm
        self.magnitudes: dict[Node, float] = {}
        self.failed: Node | None = None

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n  # named by graph_bound where only x = 0 fails
            raise
        size = magnitude(result, self.norm)
        source = n.args[0] if n.op == "call_module" and n.args else None
        if isinstance(source, Node) and isinstance(self.env.get(source), Tensor):
            module = self.fetch_attr(n.target)
            size = max(size, internal_size(module, self.env[source], self.norm))
        self.magnitudes[n] = size
        return result


def _probe_at_zero(probe: _ZeroProbe, x: Tensor) -> tuple[_Probe, Any, ValueError | None]:
    """The probe, its output and None after ``probe`` ran at x = 0. Where the graph fails at 0
    but not at the random probe ``x`` (``torch.linalg.inv`` of the input, an assertion that
    x != 0), a :class:`_Probe` run at ``x``, its output and a ValueError naming the failure at
    0, for :func:`graph_bound` to raise once the rules have run: a rule's refusal names the
    operation's problem, where the failure at 0 read as 'does not fit' or came as a raw
    AssertionError. A failure at ``x`` too is raised as the probe raises it.

    The probe runs on the kernels the user's settings pick, as the certificate's forward does:
    the rules read the constants it computes (a weight or a scale computed from parameters), and
    oneDNN and ATen sum a convolution in different orders (a scale conv2d(a, k) that cancels to
    0.001 on ATen's and 1.001 on oneDNN's was bounded 1000 times too small, radius 532 broken at
    1.5, while the probe ran with oneDNN off). No switch either: torch's are process-wide, so a
    bound holding one would change the kernels of another thread's probe or forward."""
    try:
        return probe, probe.run(torch.zeros_like(x)), None
    except Exception as err:
        failure = _zero_failure(probe, err)
    fallback = _Probe(probe.module, probe.input_shape, probe.model_name)
    return fallback, fallback.run(x.clone()), failure  # in-place layers may write x


def _zero_failure(probe: _ZeroProbe, err: Exception) -> ValueError:
    """The ValueError for a graph that fails at x = 0 (``err``) but not at a random input."""
    where = f"{_describe(probe.failed)} (node '{probe.failed.name}')" if probe.failed else "it"
    cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ else err
    error = ValueError(
        f"{probe.model_name} fails at the input 0, where the bound measures the sizes of its "
        f"intermediate values for the rounding allowance: {where} raised "
        f"{type(cause).__name__}: {cause}"
    )
    error.__cause__ = cause
    return error


def check_input_fits(model: nn.Module, input_shape: tuple[int, ...], example: Tensor) -> None:
    """ValueError naming the layer and the shapes when ``model`` cannot take ``example[:1]``,
    an input of ``input_shape``: one shape probe of the traced graph (as :func:`graph_bound`
    runs). A model torch.fx cannot trace is not checked (TypeError from :func:`trace` caught)."""
    try:
        gm = trace(model)
    except TypeError:
        return
    with torch.no_grad():
        _Probe(gm, tuple(input_shape), type(model).__name__).run(example[:1])


def _picks_first(env: dict[Node, Any], node: Node) -> bool:
    """Whether ``size[index]`` (``node``) may read entry 0 of the size (the batch size)."""
    size, index = node.args
    index = env[index] if isinstance(index, Node) else index
    try:
        picked = range(len(env[size]))[index]
    except TypeError:
        return True
    return picked == 0 if isinstance(picked, int) else 0 in picked


def _describe(node: Node) -> str:
    """The operation of ``node``, for messages: a module path and type, or a function name."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return f"module '{node.target}' ({type(module).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.target is builtins.getattr:
        return f"Tensor.{node.args[1]}"
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
    dtypes: dict[Node, torch.dtype | None]
    constants: dict[Node, Any]
    depends: set[Node]
    batch_sized: set[Node]
    bounds: dict[Node, float] = field(default_factory=dict)
    roots: dict[Node, float] = field(default_factory=dict)  # Step.root where not None

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
        return sqrt_up(Fraction(math.prod(self.shapes[out]), math.prod(self.shapes[arg])))

    def term(self, arg: Any, out: Node) -> float:
        """Contribution of ``arg`` to the bound of ``out`` in a sum (broadcast included)."""
        return mul_up(self.spread(arg, out), self.bound(arg)) if self.is_dependent(arg) else 0.0


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


#: Methods whose second argument gives only a shape: its values are not read.
SHAPE_ARGUMENTS = frozenset({"view_as", "reshape_as", "expand_as"})


def _unary(ctx: _Context, node: Node, factor: float, root: float | None = None) -> Step:
    """``factor`` times the bound of the node's first argument, its only input-dependent one:
    no other argument may depend on the input, that first argument passed again included
    (``F.linear(x, W, x)`` adds x as its bias: ||W + I||, not ||W||)."""
    source = node.args[0]
    shape_only = node.op == "call_method" and node.target in SHAPE_ARGUMENTS
    rest = () if shape_only else (node.args[1:], node.kwargs)
    if any(ctx.is_dependent(n) for n in _nodes_in(rest)):
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') combines several input-dependent tensors; "
            "no rule bounds that: wrap it in a module and register a rule for it"
        )
    return Step(factor, mul_up(factor, ctx.bound(source)), root)


def _batch_error(node: Node, what: str) -> TypeError:
    return TypeError(
        f"{_describe(node)} (node '{node.name}') {what}: samples must be processed "
        "independently, so dimension 0 (the batch) must stay first and untouched"
    )


def _variadic(node: Node, key: str) -> list[Any]:
    """Sizes or dims given as ``f(x, *sizes)``, ``f(x, sizes)`` or ``f(x, key=sizes)``."""
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], tuple | list):
        return list(args[0])
    if args:
        return list(args)
    value = node.kwargs.get(key)
    return list(value) if isinstance(value, tuple | list) else [] if value is None else [value]


def _is_shape_of_dependent(ctx: _Context, arg: Any) -> bool:
    """Whether ``arg`` is ``t.shape`` or ``t.size()`` of an input-dependent tensor t."""
    if not isinstance(arg, Node) or not arg.args or not ctx.is_dependent(arg.args[0]):
        return False
    if arg.target is builtins.getattr:
        return arg.args[1] == "shape"
    return arg.op == "call_method" and arg.target == "size" and _arg(arg, 1, "dim") is None


def _is_batch_size(ctx: _Context, arg: Any) -> bool:
    """Whether ``arg`` is the batch size read directly: ``t.size(0)``, ``t.shape[0]``, ``len(t)``
    of an input-dependent tensor t."""
    if not isinstance(arg, Node) or not arg.args:
        return False
    source = arg.args[0]
    if arg.target is builtins.len:
        return ctx.is_dependent(source)
    if arg.op == "call_method" and arg.target == "size":
        dim = _arg(arg, 1, "dim")
        return (
            ctx.is_dependent(source) and isinstance(dim, int) and dim % len(ctx.shapes[source]) == 0
        )
    if arg.target is operator.getitem and _is_shape_of_dependent(ctx, source):
        index = arg.args[1]
        return isinstance(index, int) and index % len(ctx.constants[source]) == 0
    return False


def _batch_size_arguments(ctx: _Context, node: Node) -> set[Node]:
    """The batch-size nodes a view / reshape / expand may take: its first size, or a whole
    ``t.shape``."""
    name = target_name(node)
    if name not in ("view", "reshape", "expand"):
        return set()
    sizes = _variadic(node, "size" if name == "expand" else "shape")  # the keyword each takes
    if len(sizes) == 1 and _is_shape_of_dependent(ctx, sizes[0]):
        return {sizes[0]}
    return {sizes[0]} if sizes and _is_batch_size(ctx, sizes[0]) else set()


def _keeps_batch(ctx: _Context, node: Node) -> bool:
    """Whether a reindexing op leaves dimension 0 (the batch) first and whole."""
    name, ndim = target_name(node), len(ctx.shapes[node.args[0]])

    def dim(index: int, key: str, default: Any = None) -> int:
        return ctx.value(_arg(node, index, key, default)) % ndim

    if name in ("narrow", "unflatten"):
        return dim(1, "dim") != 0
    if name in ("chunk", "split"):
        return dim(2, "dim", 0) != 0
    if name == "unbind":
        return dim(1, "dim", 0) != 0
    if name in ("transpose", "swapaxes", "swapdims"):
        first, second = dim(1, "dim0"), dim(2, "dim1")
        return first == second or 0 not in (first, second)
    if name == "movedim":
        moved = [
            *_ints(ctx.value(_arg(node, 1, "source"))),
            *_ints(ctx.value(_arg(node, 2, "destination"))),
        ]
        return all(d % ndim for d in moved)
    if name == "permute":
        dims = _variadic(node, "dims")
        return bool(dims) and ctx.value(dims[0]) % ndim == 0
    if name == "flatten":
        return dim(1, "start_dim", 0) != 0 or dim(2, "end_dim", -1) == 0
    if name == "squeeze":
        squeezed = _arg(node, 1, "dim")
        return squeezed is not None and all(d % ndim for d in _ints(ctx.value(squeezed)))
    if name == "unsqueeze":
        return ctx.value(_arg(node, 1, "dim")) % (ndim + 1) != 0
    if name == "t":
        return ndim < 2
    if name in ("view", "reshape"):
        return _reshape_keeps_batch(ctx, node)
    if name in ("view_as", "reshape_as"):
        return ctx.is_dependent(_arg(node, 1, "other"))
    return True  # entrywise: clone, neg, contiguous, detach; pixel (un)shuffle act per sample


def _ints(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _reshape_keeps_batch(ctx: _Context, node: Node) -> bool:
    """A view / reshape keeps the batch first when its first size is the batch size or -1 (with
    a batch of one first in the recorded shape, checked for every node: the other sizes then hold
    one sample)."""
    if _batch_size_arguments(ctx, node):
        return True
    sizes = _variadic(node, "shape")
    if len(sizes) == 1 and isinstance(sizes[0], Node):  # a constant shape
        sizes = list(ctx.value(sizes[0]))
    return bool(sizes) and ctx.value(sizes[0]) == -1


#: Each output entry is one input entry, used once: L unchanged in every l_p norm.
REINDEXING = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
    torch.movedim, torch.squeeze, torch.unsqueeze, torch.narrow, torch.chunk, torch.split,
    torch.unbind, torch.t, torch.clone, torch.neg, operator.neg, operator.pos, F.pixel_shuffle,
    F.pixel_unshuffle, "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "permute", "transpose", "swapaxes", "movedim", "squeeze", "unsqueeze", "contiguous", "clone",
    "t", "narrow", "chunk", "split", "unbind", "neg", "detach",
)  # fmt: skip
#: Reindexing ops whose pieces, together, hold every entry of their input once.
PARTITIONS = frozenset({torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind"})


@_rule(*REINDEXING)
def _reindex(ctx: _Context, node: Node) -> Step:
    if ctx.dtypes[node] != ctx.dtypes[node.args[0]]:
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') reinterprets the bits of a "
            f"{ctx.dtypes[node.args[0]]} tensor as {ctx.dtypes[node]}, which is not Lipschitz"
        )
    if not _keeps_batch(ctx, node):
        raise _batch_error(node, "moves, splits or merges the batch dimension")
    return _unary(ctx, node, 1.0)


def _is_exact_cast(source: torch.dtype | None, target: torch.dtype | None) -> bool:
    """Whether every value of ``source`` is a value of ``target`` (floating types)."""
    if (
        source is None
        or target is None
        or not (source.is_floating_point and target.is_floating_point)
    ):
        return False
    wide, narrow = torch.finfo(target), torch.finfo(source)
    return source == target or (wide.eps <= narrow.eps and wide.max >= narrow.max)


@_rule("float", "double", "half", "bfloat16", "to", "type")
def _cast(ctx: _Context, node: Node) -> Step:
    """A cast to a floating type that holds every input value is exact: L unchanged."""
    source, target = ctx.dtypes[node.args[0]], ctx.dtypes[node]
    if not _is_exact_cast(source, target):
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') casts {source} to {target}, which rounds or "
            "truncates (not Lipschitz, and not covered by the float64 rounding allowance): "
            "only casts to a floating type that holds every input value are supported"
        )
    return _unary(ctx, node, 1.0)


@_rule(builtins.getattr)
def _attribute(ctx: _Context, node: Node) -> Step:
    source, name = node.args
    if name in ("values", "indices") and _is_indexed_extreme(source):
        _check_values_picked(ctx, node, source, name)
        return _unary(ctx, node, 1.0)
    ndim = len(ctx.shapes[source])
    if name not in ("T", "mT"):
        raise TypeError(f"no Lipschitz bound rule for the tensor attribute {name!r}")
    if (name == "T" and ndim >= 2) or (name == "mT" and ndim < 3):
        raise _batch_error(node, "transposes the batch dimension")
    return _unary(ctx, node, 1.0)


@_rule(operator.getitem)
def _getitem(ctx: _Context, node: Node) -> Step:
    """One piece of a tuple, or basic indexing of a tensor (a subset of its entries, once)."""
    source, index = node.args
    if isinstance(ctx.shapes[source], list):
        _check_values_picked(ctx, node, source, ctx.value(index))
    else:
        if not _is_basic_index(ctx, index):
            raise TypeError(
                f"indexing with {index} (node '{node.name}') may repeat entries: only ints, "
                "slices, None and ... are supported"
            )
        if not _index_keeps_batch(index, len(ctx.shapes[source])):
            raise _batch_error(node, f"indexes the batch dimension with {index}")
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


def _index_keeps_batch(index: Any, ndim: int) -> bool:
    """A basic index leaves dimension 0 alone when it starts with ``:``, or with ``...`` followed
    by fewer indexed dimensions than the tensor has (so that ``...`` covers dimension 0)."""
    entries = index if isinstance(index, tuple) else (index,)
    if not entries:
        return True
    first = entries[0]
    if isinstance(first, slice):
        return first == slice(None)
    indexed = [e for e in entries[1:] if e is not None and not isinstance(e, bool)]
    return first is Ellipsis and len(indexed) < ndim


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
    **dict.fromkeys((F.softmax, torch.softmax, "softmax"), (nn.Softmax, ("dim",))),
    F.softmin: (nn.Softmin, ("dim",)),
    **dict.fromkeys((F.log_softmax, torch.log_softmax, "log_softmax"), (nn.LogSoftmax, ("dim",))),
    F.lp_pool1d: (nn.LPPool1d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
    F.lp_pool2d: (nn.LPPool2d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
}  # fmt: skip


@_rule(*FUNCTIONAL_MODULES)
def _as_module(ctx: _Context, node: Node) -> Step:
    """The rule of the equivalent module, built from the call's arguments."""
    module = _functional_module(ctx, node)
    input_shape = ctx.sample_shape(node.args[0])
    return _unary(ctx, node, module_bound(module, ctx.norm, input_shape), output_root(module))


def _functional_module(ctx: _Context, node: Node) -> nn.Module:
    """The module (eval mode) of a call of a :data:`FUNCTIONAL_MODULES` function, built from the
    call's constant arguments."""
    module_type, names = FUNCTIONAL_MODULES[node.target]
    return module_type(**_named_arguments(ctx, node, names)).eval()


def _named_arguments(ctx: _Context, node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The constant arguments ``names`` that follow the input, given by position or keyword."""
    given = dict(zip(names, node.args[1:], strict=False))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    return ctx.value(given)


#: F.interpolate's arguments after the input.
INTERPOLATE_ARGUMENTS = (
    "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"
)  # fmt: skip


@_rule(F.interpolate)
def _interpolate(ctx: _Context, node: Node) -> Step:
    """A linear map of each channel with nonnegative weights, bounded at the input's size by
    :func:`~lipcert.bounds.rules.interpolation_bound`. Dimensions 0 and 1 are always the batch
    and the channels, never mixed."""
    settings = _named_arguments(ctx, node, INTERPOLATE_ARGUMENTS)
    resize = functools.partial(F.interpolate, **settings)
    mode, shape = settings.get("mode", "nearest"), ctx.sample_shape(node.args[0])
    bound = interpolation_bound(resize, mode, shape, ctx.norm)
    return _unary(ctx, node, bound, interpolation_root(mode))


@_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
def _dropout(ctx: _Context, node: Node) -> Step:
    if ctx.value(_arg(node, 2, "training", True)):
        raise ValueError(f"{_describe(node)} with training=True is random: trace in eval mode")
    return _unary(ctx, node, 1.0)


def _check_same_rank(ctx: _Context, node: Node, *operands: Any) -> None:
    """Broadcasting must not prepend dimensions to an input-dependent operand (its batch
    dimension would move and later ops could mix samples)."""
    rank = len(ctx.shapes[node])
    if any(ctx.is_dependent(a) and len(ctx.shapes[a]) != rank for a in operands):
        raise _batch_error(node, "broadcasts an operand to more dimensions")


@_rule(operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub,
       torch.sub, "sub", "sub_")  # fmt: skip
def _add(ctx: _Context, node: Node) -> Step:
    return _combination(ctx, node, node.args[0], _arg(node, 1, "other"))


@_rule(torch.rsub)
def _rsub(ctx: _Context, node: Node) -> Step:
    """``torch.rsub(a, b, alpha=...)`` is b - alpha a."""
    return _combination(ctx, node, _arg(node, 1, "other"), node.args[0])


def _combination(ctx: _Context, node: Node, a: Any, b: Any) -> Step:
    """a + alpha b (or minus): L(a) + |alpha| L(b), each with its broadcast repeats; alpha as the
    result's type may round it (like a constant factor, :func:`_as_applied`)."""
    _check_same_rank(ctx, node, a, b)
    alpha = _largest_abs(ctx.value(node.kwargs.get("alpha", 1)), ctx.dtypes.get(node))
    return Step(None, add_up(ctx.term(a, node), mul_up(alpha, ctx.term(b, node))))


def _as_applied(value: Any, dtype: torch.dtype | None) -> Tensor:
    """A constant's entries as float64, beside the values an operation whose result has type
    ``dtype`` may apply instead: the constant rounded to ``dtype`` and to float32 (the arithmetic
    of half types). float32 turns 1.2 * 2^-149 into 2^-149, so x / 1.2e-45 has slope 1.2 times
    1 / 1.2e-45; a Python number and a 0-dim tensor of any type are both rounded so."""
    exact = torch.as_tensor(value, dtype=torch.float64)
    if dtype is None or not dtype.is_floating_point:
        return exact
    rounded = [exact.to(t).double() for t in (dtype, torch.promote_types(dtype, torch.float32))]
    return torch.stack([exact, *rounded])


def _largest_abs(value: Any, dtype: torch.dtype | None) -> float:
    return float(_as_applied(value, dtype).abs().max())


@_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def _mul(ctx: _Context, node: Node) -> Step:
    a, b = node.args[0], _arg(node, 1, "other")
    if ctx.is_dependent(a) and ctx.is_dependent(b):
        raise TypeError(
            f"node '{node.name}' multiplies two input-dependent tensors, which is not globally "
            "Lipschitz: no sound bound exists"
        )
    _check_same_rank(ctx, node, a, b)
    source, constant = (a, b) if ctx.is_dependent(a) else (b, a)
    largest = _largest_abs(ctx.value(constant), ctx.dtypes.get(node))
    factor = mul_up(largest, ctx.spread(source, node))
    return Step(factor, mul_up(factor, ctx.bound(source)))


@_rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def _div(ctx: _Context, node: Node) -> Step:
    divisor = _arg(node, 1, "other")
    if ctx.is_dependent(divisor) or node.kwargs.get("rounding_mode") is not None:
        raise TypeError(
            f"node '{node.name}': only division of a tensor by a constant, without rounding, is "
            "Lipschitz"
        )
    _check_same_rank(ctx, node, node.args[0])
    smallest = float(_as_applied(ctx.value(divisor), ctx.dtypes.get(node)).abs().min())
    if smallest == 0:
        raise TypeError(f"node '{node.name}' divides by zero")
    spread = ctx.spread(node.args[0], node)
    factor = round_up(spread / smallest, Fraction(spread) / Fraction(smallest))
    return _unary(ctx, node, factor)


def _dims(ctx: _Context, node: Node, dim: Any, ndim: int) -> list[int]:
    """``dim`` (an int or a sequence) as non-negative ints; TypeError if it includes the batch."""
    dim = ctx.value(dim)
    dims = [dim] if isinstance(dim, int) else list(dim or ())
    dims = [d % ndim for d in dims]
    if not dims or 0 in dims:
        raise _batch_error(node, "acts across the batch dimension")
    return dims


@_rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(ctx: _Context, node: Node) -> Step:
    """Pieces side by side: squared l2 norms add; the l_inf norm is the largest piece's. All the
    pieces of one chunk / split / unbind hold each entry of its input once: L of that input."""
    _dims(ctx, node, _arg(node, 1, "dim", 0), len(ctx.shapes[node]))
    pieces = _arg(node, 0, "tensors")
    if isinstance(pieces, Node):  # the tuple returned by one op
        if pieces.target not in PARTITIONS:
            raise TypeError(
                f"{_describe(node)} (node '{node.name}') joins the tuple returned by "
                f"{_describe(pieces)}: only the pieces of chunk / split / unbind, or a list of "
                "tensors, are supported"
            )
        return Step(None, ctx.bound(pieces))
    return Step(None, _side_by_side(ctx, [ctx.bound(piece) for piece in pieces]))


def _side_by_side(ctx: _Context, bounds: list[float]) -> float:
    """sqrt(sum_i L_i^2) in l2, max_i L_i in l_inf: the bound of maps whose changes are at most
    those of pieces with bounds L_i placed side by side."""
    if ctx.norm == "linf":
        return max(bounds)
    squares = 0.0
    for b in bounds:
        squares = add_up(squares, mul_up(b, b))
    return sqrt_up(squares)


@_rule(torch.sum, "sum", torch.mean, "mean")
def _sum_or_mean(ctx: _Context, node: Node) -> Step:
    source = node.args[0]
    _dims(ctx, node, _arg(node, 1, "dim"), len(ctx.shapes[source]))
    n = Fraction(math.prod(ctx.shapes[source]), math.prod(ctx.shapes[node]))  # entries per group
    mean = node.target in (torch.mean, "mean")
    if ctx.norm == "linf":
        return _unary(ctx, node, 1.0 if mean else round_up(float(n), n), root=1.0)
    return _unary(ctx, node, sqrt_up(1 / n) if mean else sqrt_up(n), root=1.0)


@_rule(torch.amax, "amax", torch.amin, "amin")
def _extreme(ctx: _Context, node: Node) -> Step:
    """|max_g x - max_g x'| <= max_g |x - x'| <= ||(x - x')_g||: 1 in every l_p."""
    _dims(ctx, node, _arg(node, 1, "dim"), len(ctx.shapes[node.args[0]]))
    return _unary(ctx, node, 1.0)


#: Reductions that return (values, indices) when given a dim; only the values have a bound.
INDEXED_EXTREMES = frozenset({torch.max, "max", torch.min, "min"})


@_rule(*INDEXED_EXTREMES)
def _max_or_min(ctx: _Context, node: Node) -> Step:
    """``torch.max(x, dim)``: (values, indices), the values bounded as :func:`_extreme` (the
    indices are refused where they are read: :func:`_check_values_picked`);
    ``torch.max(a, b)`` of two tensors: :func:`_elementwise_extreme`; ``torch.max(x)``: every
    entry, the batch included (refused)."""
    second = _arg(node, 1, "dim", node.kwargs.get("other"))
    if second is None:
        raise _batch_error(node, "reduces every dimension, the batch included")
    if isinstance(second, Node) and isinstance(ctx.shapes.get(second), tuple):  # a tensor
        return _elementwise_extreme(ctx, node)
    _dims(ctx, node, second, len(ctx.shapes[node.args[0]]))
    return _unary(ctx, node, 1.0)


@_rule(torch.maximum, torch.minimum, "maximum", "minimum")
def _elementwise_extreme(ctx: _Context, node: Node) -> Step:
    """max(a, b) entrywise: |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|) in each entry
    (each operand with its broadcast repeats), so sqrt(L_a^2 + L_b^2) in l2 and max(L_a, L_b)
    in l_inf; L(a) with a constant b (a clamp)."""
    a, b = node.args[0], _arg(node, 1, "other")
    _check_same_rank(ctx, node, a, b)
    return Step(None, _side_by_side(ctx, [ctx.term(a, node), ctx.term(b, node)]))


def _check_values_picked(ctx: _Context, node: Node, source: Node, picked: Any) -> None:
    """TypeError when ``node`` reads the indices of a ``torch.max(x, dim)`` (``source``): an
    index jumps where two entries tie, which no Lipschitz bound covers."""
    if _is_indexed_extreme(source) and picked not in (0, -2, "values"):
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') reads the indices of {_describe(source)} "
            f"(node '{source.name}'), which jump where entries tie (not Lipschitz, not even "
            "continuous): take its values alone (x.max(dim).values, or x.amax(dim))"
        )


def _is_indexed_extreme(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in INDEXED_EXTREMES


@_rule(torch.abs, torch.absolute, "abs", "absolute", torch.clamp, torch.clip, "clamp", "clip")
def _entrywise_contraction(ctx: _Context, node: Node) -> Step:
    """|g(a) - g(b)| <= |a - b| in every entry (the absolute value; a clamp to bounds that do not
    depend on the input): 1 in every l_p. Both are exact in floating point (no rounding)."""
    return _unary(ctx, node, 1.0)


@_rule(torch.flip, "flip", torch.roll, "roll")
def _entry_permutation(ctx: _Context, node: Node) -> Step:
    """A permutation of each sample's entries (exact in floating point): an isometry in every
    l_p. Never along the batch; ``roll`` without ``dims`` rolls the flattened batch: refused."""
    if node.target in (torch.roll, "roll"):
        dims = _arg(node, 2, "dims")
    else:  # torch.flip(x, dims), x.flip(dims) or x.flip(*dims)
        rest = node.args[1:]
        dims = rest[0] if len(rest) == 1 else list(rest) or node.kwargs.get("dims")
    _dims(ctx, node, dims, len(ctx.shapes[node.args[0]]))
    return _unary(ctx, node, 1.0)


@_rule("repeat", torch.tile, "tile", "expand", "expand_as")
def _copies(ctx: _Context, node: Node) -> Step:
    """Each entry of a sample copied r times, r the output's entries over the input's: sqrt(r)
    in l2 (the squared changes add r times), 1 in l_inf. The batch dimension must stay as it is:
    ``repeat`` with one size per dimension, the first 1; ``tile`` with at most one per dimension
    (fewer are padded with leading 1s), the batch's 1; ``expand`` with one size per dimension,
    the first -1 or the batch size (``x.size(0)``); ``expand_as`` a tensor of the same rank.
    Sizes given as one node (``x.tile(t.shape[1:])``) count as the sizes it holds: taken for one
    size, three reps of a 2-D x passed as fewer than its dims and moved the batch to dim 1."""
    if not _copies_keep_batch(ctx, node, len(ctx.shapes[node.args[0]])):
        raise _batch_error(node, "repeats the batch dimension or adds dimensions before it")
    return _unary(ctx, node, ctx.spread(node.args[0], node))


def _copies_keep_batch(ctx: _Context, node: Node, ndim: int) -> bool:
    """Whether a repeat / tile / expand / expand_as (``node``) of an ``ndim``-D tensor leaves
    dimension 0 first and as it is (:func:`_copies`)."""
    name = target_name(node)
    if name == "expand_as":
        return len(ctx.shapes[_arg(node, 1, "other")]) == ndim
    sizes = _variadic(node, {"tile": "dims", "repeat": "repeats", "expand": "size"}[name])
    if len(sizes) == 1 and isinstance(sizes[0], Node):  # t.shape[1:]: one node, several sizes
        held = ctx.value(sizes[0])
        sizes = list(held) if isinstance(held, tuple | list) else sizes
    if name == "tile" and len(sizes) < ndim:  # padded with leading 1s
        return True
    if len(sizes) != ndim:
        return False
    if name == "expand":
        return _is_batch_size(ctx, sizes[0]) or ctx.value(sizes[0]) == -1
    return ctx.value(sizes[0]) == 1


@_rule(torch.repeat_interleave, "repeat_interleave")
def _repeat_interleave(ctx: _Context, node: Node) -> Step:
    """Entry i along ``dim`` copied repeats[i] times: sqrt(max repeats) in l2, 1 in l_inf.
    Without ``dim`` the input is flattened, batch included: refused."""
    repeats = torch.as_tensor(ctx.value(_arg(node, 1, "repeats")))
    _dims(ctx, node, _arg(node, 2, "dim"), len(ctx.shapes[node.args[0]]))
    most = int(repeats.max()) if repeats.numel() else 0  # torch refuses negative counts
    return _unary(ctx, node, 1.0 if ctx.norm == "linf" else sqrt_up(most))


@_rule(torch.linalg.vector_norm, torch.norm, "norm")
def _vector_norm(ctx: _Context, node: Node) -> Step:
    """The l_p norm of groups of n entries (over ``dim``, never the batch: ``dim=None`` takes
    every entry). |||a||_p - ||b||_p| <= ||a - b||_p, and ||v||_p <= n^(1/p - 1/2) ||v||_2
    (p <= 2), <= ||v||_2 (p >= 2), <= n^(1/p) ||v||_inf: l2 bound sqrt(n) for p = 1, 1 for
    p >= 2; l_inf bound n^(1/p) (all attained: the gradient of ||v||_p at the sign vector or any
    v != 0). p = -inf (min |v_i|) is 1-Lipschitz like a min. Refused: p < 1 (not a norm: not
    Lipschitz near 0 for p in (0, 1), not continuous for p = 0), a fractional p, and the
    matrix norms ('nuc'; 'fro' over more than two dims). An integer p sums p-th powers, the
    node's root: they overflow (:func:`overflow_radius`) and, p >= 2, underflow
    (:func:`underflow_error`)."""
    source = node.args[0]
    key, default = ("ord", 2) if node.target is torch.linalg.vector_norm else ("p", "fro")
    p = ctx.value(_arg(node, 1, key, default))
    p = 2 if p is None else p  # torch.norm's p=None
    dims = _dims(ctx, node, _arg(node, 2, "dim"), len(ctx.shapes[source]))
    p = 2 if p == "fro" and len(dims) <= 2 else p
    if isinstance(p, str) or not (abs(p) == math.inf or (p >= 1 and float(p).is_integer())):
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') with p = {p!r}: only vector norms with an "
            "integer p >= 1 or p = +-inf are bounded (p < 1 is not Lipschitz)"
        )
    n = math.prod(ctx.shapes[source]) // max(1, math.prod(ctx.shapes[node]))  # group size
    if abs(p) == math.inf:
        return _unary(ctx, node, 1.0)
    if ctx.norm == "linf":
        factor = root_up(n, int(p))
    else:
        factor = sqrt_up(n) if p == 1 else 1.0
    return _unary(ctx, node, factor, float(p))


@_rule(F.linear)
def _linear(ctx: _Context, node: Node) -> Step:
    """x W^T + b: ||W||; a 1-D weight w is the row (1, n) (``F.linear`` then drops the dim)."""
    weight = torch.as_tensor(ctx.value(_arg(node, 1, "weight")))
    if weight.dim() not in (1, 2):
        raise TypeError(f"{_describe(node)} (node '{node.name}') has a {weight.dim()}-D weight")
    matrix = weight.reshape(1, -1) if weight.dim() == 1 else weight
    return _unary(ctx, node, matrix_operator_bound(matrix, ctx.norm))


@_rule(operator.matmul, torch.matmul, "matmul")
def _matmul(ctx: _Context, node: Node) -> Step:
    """x @ W applies W^T to each row of x; W @ x applies W to each column (W constant, 1-2 D).
    x must keep its batch dimension out of the product: at least 2-D on the left, 3-D on the
    right."""
    a, b = node.args[0], _arg(node, 1, "other")
    if ctx.is_dependent(a) and ctx.is_dependent(b):
        raise TypeError(f"node '{node.name}' multiplies two input-dependent tensors")
    source = a if ctx.is_dependent(a) else b
    if len(ctx.shapes[source]) < (2 if source is a else 3):
        raise _batch_error(node, "contracts the batch dimension")
    constant = torch.as_tensor(ctx.value(b if source is a else a))
    if constant.dim() not in (1, 2):
        raise TypeError(f"node '{node.name}': matmul with a {constant.dim()}-D constant")
    matrix = constant.reshape(1, -1) if constant.dim() == 1 else constant
    matrix = matrix.T if source is a and constant.dim() == 2 else matrix
    factor = matrix_operator_bound(matrix, ctx.norm)
    return Step(factor, mul_up(factor, ctx.bound(source)))


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
    if len(pad) // 2 >= len(ctx.shapes[node.args[0]]):
        raise _batch_error(node, "pads the batch dimension")
    factor = pad_factor(ctx.sample_shape(node.args[0]), tuple(pad), mode, ctx.norm)
    return _unary(ctx, node, factor)


def _module_step(ctx: _Context, node: Node) -> Step:
    module = ctx.gm.get_submodule(node.target)
    if not has_bound_rule(module):
        reason = distrust_reason(module)
        raise TypeError(
            f"no Lipschitz bound rule for {_describe(node)}{f' ({reason})' if reason else ''}; "
            "wrap it in supported modules or register a rule with "
            "lipcert.bounds.network.register_bound_rule"
        )
    source, *extra = node.args
    if extra or node.kwargs:
        given = ", ".join([*map(str, extra), *(f"{k}={v}" for k, v in node.kwargs.items())])
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') is called with more than its input "
            f"({given}): its rule bounds module(x) alone (ConvTranspose's output_size adds "
            "outputs; set output_padding on the module instead)"
        )
    if not _module_keeps_batch(module, len(ctx.shapes[source])):
        raise _batch_error(node, "flattens, splits or pads the batch dimension")
    bound = module_bound(module, ctx.norm, ctx.sample_shape(source))
    return _unary(ctx, node, bound, output_root(module))


def _module_keeps_batch(module: nn.Module, ndim: int) -> bool:
    """Whether ``module`` leaves dimension 0 of an ``ndim``-D input alone. A padding module pads
    the last len(padding) / 2 dimensions whatever the input's rank: ZeroPad2d((0, 0, 1, -1)) on
    (B, n) inputs shifts each sample into the next one's place."""
    if isinstance(module, nn.Flatten):
        return module.start_dim % ndim != 0 or module.end_dim % ndim == 0
    if isinstance(module, nn.Unflatten):
        return module.dim % ndim != 0
    if isinstance(module, PADDING_MODULES):
        return len(module.padding) // 2 < ndim
    return True


def _check_batch_size_free(ctx: _Context, node: Node) -> None:
    """The bound is computed at a batch of one and must hold at every batch size, so no constant
    derived from the batch size may reach an input-dependent op (except a view's first size,
    once: ``b = x.size(0); x.view(b, b, -1)`` spreads each sample over b rows)."""
    used = _nodes_in((node.args, node.kwargs))  # with repeats
    for first_size in _batch_size_arguments(ctx, node):
        used.remove(first_size)
    used = [a for a in used if a in ctx.batch_sized]
    if used:
        raise TypeError(
            f"{_describe(node)} (node '{node.name}') uses {_describe(used[0])} (node "
            f"'{used[0].name}'), which depends on the batch size: the bound is per sample and "
            "computed at a batch of one. Only a view / reshape may take the batch size, as its "
            "first size (x.view(x.size(0), -1))"
        )


def _check_batch_first(ctx: _Context, node: Node) -> None:
    """Every input-dependent tensor keeps the batch (of one, in the probe) as dimension 0."""
    shape = ctx.shapes[node]
    pieces = shape if isinstance(shape, list) else [shape] if isinstance(shape, tuple) else []
    if any(not piece or piece[0] != 1 for piece in pieces):
        raise _batch_error(node, f"gives shape {shape} on a batch of one")


def _node_step(ctx: _Context, node: Node) -> Step:
    if node.op == "placeholder":
        return Step(None, 1.0)
    _check_batch_size_free(ctx, node)
    if node.op == "call_module":
        step = _module_step(ctx, node)
    else:
        rule = FUNCTION_RULES.get(node.target)
        if rule is None or node.op not in ("call_function", "call_method"):
            raise TypeError(
                f"no Lipschitz bound rule for {_describe(node)} (node '{node.name}'); wrap it in "
                "an nn.Module and register a rule with lipcert.bounds.network.register_bound_rule"
            )
        step = rule(ctx, node)
        _check_no_narrowing(ctx, node)
    _check_batch_first(ctx, node)
    return step


def _check_no_narrowing(ctx: _Context, node: Node) -> None:
    """An operation whose result has a less precise floating type than an input-dependent
    operand (``x.sum(dtype=torch.bfloat16)``) rounds like a narrowing cast: refused."""
    result = ctx.dtypes[node]
    if result is None:  # not a tensor: sizes and the like, which their rules check
        return
    for operand in node.all_input_nodes:
        source = ctx.dtypes[operand]
        floating = source is not None and source.is_floating_point
        if ctx.is_dependent(operand) and floating and not _is_exact_cast(source, result):
            raise TypeError(
                f"{_describe(node)} (node '{node.name}') turns a {source} operand into a "
                f"{result} result, which rounds (not Lipschitz, and not covered by the "
                "rounding allowance): compute it in the operand's type"
            )


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def natural_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in when no input dtype is given: its first floating
    parameter's, else its first floating buffer's with a dimension (a 0-dim tensor does not set
    a result's type: a float64 scalar buffer divides a float32 input in float32), else torch's
    default."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.dim() > 0)]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())


def _probe_input(
    model: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None
) -> Tensor:
    """A random input in the least precise of ``input_dtype`` and the model's natural dtype: a
    float32 model that casts a float64 input runs in float32 (its cast rounds within the
    float32 allowance of ``lipcert.certify``, which takes the least precise dtype too)."""
    reference = next(iter([*model.parameters(), *model.buffers()]), None)
    device = reference.device if reference is not None else None
    given = input_dtype is not None and input_dtype.is_floating_point
    dtypes = [natural_dtype(model), *([input_dtype] if given else [])]
    dtype = max(dtypes, key=lambda t: torch.finfo(t).eps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen, dtype=dtype)
    return x if device is None else x.to(device)


def _check_single_input(gm: GraphModule, name: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        raise TypeError(f"{name}.forward must take exactly one tensor to be bounded")


def _check_no_hooks(model: nn.Module) -> None:
    """Hooks and methods set on an instance (``forward``, ``_conv_forward``...) change what a
    module computes, unseen by the trace (the root's) or by the rule of a module kept whole:
    refused everywhere."""
    for name, module in model.named_modules():
        reason = hook_reason(module)
        if reason is not None:
            where = f"module '{name}'" if name else "the model"
            raise TypeError(
                f"{where} ({type(module).__name__}) has {reason}, which can change what it "
                "computes unseen by the bound: remove it before bounding (a hook: "
                "handle.remove(); a patched method: del module.<name>)"
            )


#: What ``module(x)`` runs around ``forward``.
CALL_METHODS = ("__call__", "_wrapped_call_impl", "_call_impl")


def _check_own_call(model: nn.Module) -> None:
    """TypeError when the model's class redefines what ``model(x)`` runs around its forward
    (a ``__call__`` adding a bump that no probe of the trace sees was left unbounded: bound 1.0,
    radius 0.141 broken at 0.051). Tracing reads the root's forward alone; a submodule's call is
    traced through, and a GraphModule's wrapper of its parent's call changes nothing."""
    for name in CALL_METHODS:
        if _called_method(type(model), name) is not getattr(nn.Module, name):
            raise TypeError(
                f"{type(model).__name__} redefines {name}, which runs around the forward that the "
                "bound traces: move what it adds into forward"
            )


def _called_method(cls: type, name: str) -> Any:
    """The method ``name`` that calling an instance of ``cls`` runs, past the wrapper a
    GraphModule's class puts around its parent's ``__call__`` (``_WrappedCall`` with no call of
    its own runs ``super(cls, self).__call__``)."""
    wrapped = vars(cls).get("_wrapped_call")
    if name == "__call__" and isinstance(wrapped, _WrappedCall) and wrapped.cls_call is None:
        return _called_method(cls.__mro__[1], name)
    return getattr(cls, name)


def _check_trace(model: nn.Module, gm: GraphModule, x: Tensor) -> None:
    """The traced graph must compute what the model computes (in-place updates seen through other
    references, for instance, are lost by tracing) at each of :data:`TRACE_CHECK_SCALES` times
    ``x``. The scales go in one batch (a forward of three samples costs about what one sample's
    does: ~1.3 ms less per bound); where that batch fails or differs, each scale alone decides,
    and its error names the problem."""
    batch = torch.cat([scale * x for scale in TRACE_CHECK_SCALES])
    try:
        if _reproduces(model, gm, batch):
            return
    except Exception:  # any failure on three samples (a model that asserts a batch of one with
        pass  # torch._assert raises AssertionError) is decided one scale at a time below
    for scale in TRACE_CHECK_SCALES:
        if not _reproduces(model, gm, scale * x):
            raise TypeError(
                f"the torch.fx trace of {type(model).__name__} does not reproduce its output (an "
                "in-place update seen through another reference?): it cannot be bounded soundly"
            )


def _reproduces(model: nn.Module, gm: GraphModule, x: Tensor) -> bool:
    """Whether ``gm`` and ``model`` give the same output on ``x`` (each on its own copy: in-place
    layers may overwrite their input); TypeError if either output is not one tensor."""
    with torch.no_grad():
        traced, expected = gm(x.clone()), model(x.clone())
    _check_one_tensor(model, traced)
    _check_one_tensor(model, expected)
    return torch.allclose(
        traced, expected, rtol=TRACE_CHECK_RTOL, atol=TRACE_CHECK_RTOL, equal_nan=True
    )


def _check_one_tensor(model: nn.Module, output: Any) -> None:
    """TypeError unless ``output``, what ``model`` returned, is one tensor."""
    if not isinstance(output, Tensor):
        raise TypeError(f"{type(model).__name__} must return one tensor to be bounded")


def _captured_constants(gm: GraphModule, model: nn.Module) -> tuple[Tensor, ...]:
    """The tensors the graph reads (get_attr) that are not ``model``'s parameters or buffers."""
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    read = [functools.reduce(getattr, target.split("."), gm) for target in targets]
    return tuple(t for t in read if isinstance(t, Tensor) and id(t) not in own)


def _read_tensors(gm: GraphModule) -> Iterator[tuple[str, Tensor]]:
    """(description, tensor) of every tensor the traced graph reads itself (get_attr: buffers,
    attributes and captured constants; a module kept whole reads its own, bounded by its rule,
    like an l_inf-distance layer's p = inf)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), gm)
            if isinstance(value, Tensor):
                yield f"tensor {node.target}", value


#: What a NaN or inf tensor means for the bound: NaN or inf parameters and graph constants have
#: no bound (a rule's eigen-decomposition would fail, a max() would read NaN as 1), even where the
#: forward slices them away.
NO_BOUND = "the model has no bound"


def graph_bound(
    model: nn.Module,
    input_shape: tuple[int, ...],
    norm: str = "l2",
    input_dtype: torch.dtype | None = None,
) -> GraphBound:
    """Sound bound of ``model``'s Lipschitz constant (eval mode) on inputs of ``input_shape``
    and ``input_dtype`` (default: the model's own, :func:`natural_dtype`; see
    :func:`_probe_input`), which decides how the forward rounds its constants and where its
    values underflow.

    ``input_shape`` excludes the batch dimension. TypeError when an operation has no rule or the
    model cannot be traced; ValueError when ``input_shape`` does not fit the model.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    name = type(model).__name__
    _check_no_hooks(model)
    _check_own_call(model)
    check_finite(((f"parameter {key}", p) for key, p in model.named_parameters()), NO_BOUND)
    gm, is_chain = _trace(model, norm)
    check_finite(_read_tensors(gm), NO_BOUND)
    _check_single_input(gm, name)
    check_in_place(gm, _describe)  # before running anything: no write to the model's tensors
    x = _probe_input(model, tuple(input_shape), input_dtype)
    probe = _ZeroProbe(gm, tuple(input_shape), name, norm)
    with torch.no_grad():
        probe, output_value, zero_failure = _probe_at_zero(probe, x)
        if is_chain:  # the Sequential's own calls (~1 ms of a ~15 ms bound for the LMT CNN)
            _check_one_tensor(model, output_value)
        else:
            _check_trace(model, gm, x)
    ctx = _Context(
        gm, norm, probe.shapes, probe.dtypes, probe.constants, probe.depends, probe.batch_sized
    )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    needed = _ancestors(result) if isinstance(result, Node) else set()
    records = []
    for node in gm.graph.nodes:  # every input-dependent node, read by the output or not
        if ctx.is_dependent(node) and node.op != "output":
            step = _node_step(ctx, node)
            if not step.bound >= 0:  # NaN, or a rule that read a negative scale
                where = f"{_describe(node)} (node '{node.name}')"
                raise ValueError(f"{where} has no bound: {step.bound}")
            ctx.bounds[node] = step.bound
            if step.root is not None:
                ctx.roots[node] = step.root
            if node in needed and node.op != "placeholder":
                records.append(_record(ctx, node, step))
    if zero_failure is not None:
        raise zero_failure
    rounding_terms = (
        zero_input_scale(ctx, probe.magnitudes, result),
        underflow_error(ctx, result),
        _captured_constants(gm, model),
        overflow_radius(ctx, probe.magnitudes),
    )
    return _summary(ctx, result, tuple(records), rounding_terms)


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


#: Forwards that compute F.linear(x, self.weight, self.bias) and nothing else.
_LINEAR_FORWARDS = (nn.Linear.forward, ConstrainedLinear.forward)


def _computes_linear(module: nn.Module) -> bool:
    """Whether ``module``'s output is x W^T + b with its own ``weight``: the head form reads the
    weight's rows, so a subclass with another forward (10 F.linear(...), rows normalized inside)
    must not pass for one (certified 30.0 at an exact distance of 3.0)."""
    return isinstance(module, nn.Linear) and type(module).forward in _LINEAR_FORWARDS


def _summary(
    ctx: _Context, result: Any, records: tuple[NodeBound, ...], rounding_terms: tuple
) -> GraphBound:
    """The GraphBound; ``rounding_terms``: its zero_input_scale, underflow_error, constants and
    overflow_radius."""
    bound = ctx.bound(result)
    if result.op == "call_module":
        module = ctx.gm.get_submodule(result.target)
        source = result.args[0]
        if _computes_linear(module) and ctx.is_dependent(source):
            return GraphBound(bound, records, module, ctx.bound(source), *rounding_terms)
    return GraphBound(bound, records, None, None, *rounding_terms)


def _entries(shape: Any) -> int:
    """Entries of a tensor shape, or of a list of shapes."""
    if isinstance(shape, list):
        return sum(math.prod(piece) for piece in shape)
    return math.prod(shape) if isinstance(shape, tuple) else 0


def _carried(ctx: _Context, node: Node, bound: float) -> float:
    """L / L_n: how much of ``node``'s output reaches the output (see :func:`zero_input_scale`);
    inf when L_n = 0 (the share cannot be bounded)."""
    prefix = ctx.bounds[node]
    return bound / prefix if prefix > 0 else math.inf


def underflow_error(ctx: _Context, output: Any) -> float:
    """sum_n N_n tiny L / L_n over the input and the input-dependent operations n: below the
    smallest normal float (tiny) a value is resolved only absolutely, to the smallest subnormal,
    or to tiny itself where the processor flushes subnormal results to zero or reads subnormal
    inputs as zero (``torch.set_flush_denormal(True)``, some GPU kernels): an error below tiny
    per rounding, whichever mode runs. Each of n's output entries sums at most as many such
    roundings as n has input entries (N_n: output entries times input entries; the input's own
    entries for the input), and L / L_n carries them to the output (see
    :func:`zero_input_scale`). Negligible for ordinary nets (~1e-30); a layer of weights ~1e-43
    whose outputs later layers scale back up by 1e43 was certified at 0.0097 and broken at
    0.0055 without it, and x * 2^-120 * 2^120 under flush-to-zero at 0.0186 and 0.005 with the
    subnormal resolution. inf when an operation with L_n = 0 is followed by a nonzero bound.

    An output that is the p-th root of a sum of p-th powers (a vector norm, an LP pool: the
    node's ``root`` p > 1) is resolved far more coarsely: |x|^p underflows for |x| < tiny^(1/p) (the
    l2 norm of (1e-25, 0) is 0 in float32), each power, sum and scaling rounds within tiny
    (:data:`ROOT_ROUNDINGS` N_in of them per output entry, as the pool's average then times k
    computes it) and |s^(1/p) - s'^(1/p)| <= |s - s'|^(1/p): N_n (ROOT_ROUNDINGS N_in tiny)^(1/p)
    for its N_n output entries."""
    bound, total = ctx.bound(output), 0.0
    if bound == 0:
        return total
    for node in ctx.gm.graph.nodes:
        dtype = ctx.dtypes.get(node)
        if node.op == "output" or not ctx.is_dependent(node) or dtype is None:
            continue
        if not dtype.is_floating_point:
            continue
        inputs = sum(_entries(ctx.shapes[a]) for a in node.all_input_nodes if ctx.is_dependent(a))
        outputs, tiny = _entries(ctx.shapes[node]), torch.finfo(dtype).tiny
        if outputs == 0:  # an empty tensor rounds nothing
            continue
        root = ctx.roots.get(node, 1.0)
        if root == 1:
            error = outputs * max(1, inputs) * tiny
        else:
            error = outputs * (ROOT_ROUNDINGS * max(1, inputs) * tiny) ** (1 / root)
        total += error * _carried(ctx, node, bound)
    return total


#: How far below the dtype's largest float a value must stay (:func:`overflow_radius`): room for
#: the roundings of the sums that produce it.
OVERFLOW_MARGIN = 2.0


def overflow_radius(ctx: _Context, magnitudes: dict[Node, float]) -> float:
    """R such that no value the forward computes overflows at any input x' with ||x'|| < R.

    The rounding allowance is computed at the certified point x, where a non-finite logit gives
    no radius; a value that overflows at a point x' inside the ball (inf, then inf - inf = NaN)
    can still change the computed class there. As for :func:`zero_input_scale`, the values of
    an operation n at x' are at most ||h_n(0)|| + L_n ||x'|| (its size at x = 0, ``magnitudes``,
    a module's internal size included), so they stay below T_n = max / OVERFLOW_MARGIN (the
    largest float of n's dtype) while ||x'|| < (T_n - ||h_n(0)||) / L_n. An operation that sums
    p-th powers of its input's entries (``ctx.roots``) computes values its output does not
    bound: any partial sum of them stays below T while each of the N input entries is below
    (T / N)^(1/p), N the input's entries. A p-th root (a vector norm, an LP pool) raises them
    to the power p first, ~1.4e9 for p = 4 in float32 (an LP pool of 1e9 was certified at
    3.5e10, its class changed at 2e10 where x^4 overflows); an average (p = 1: a mean, an
    average pool, area interpolation) sums N times its output (a mean of 64 entries of 6e36,
    certified around 0 at 1.4e38, is NaN); a sum adds terms that cancel (4 a - 4 a, 4 a near
    the largest float, certified at 5e37 in l_inf, inf 1e37 away), and so can a linear map's
    partial sums (:func:`_partial_sums_size`). The p-th root's own argument, a sum of p-th
    powers plus a constant (an l2 pool's eps), is the output entry to the power p: it stays
    below T while the output is below T^(1/p) (sqrt(x^2 + 3e38) is inf from x = 6.3e18, where
    the N-entry check alone certified 1.3e19). 0 when some value overflows at every input; inf
    when no operation grows with the input."""
    radius = math.inf
    for node in ctx.gm.graph.nodes:
        dtype = ctx.dtypes.get(node)
        if node.op in ("placeholder", "output") or not ctx.is_dependent(node):
            continue
        if dtype is None or not dtype.is_floating_point:
            continue
        ceiling = torch.finfo(dtype).max / OVERFLOW_MARGIN
        size = _partial_sums_size(ctx, node, magnitudes)
        radius = min(radius, _room(ceiling, size, ctx.bounds[node]))
        module = _node_module(ctx, node)
        if module is not None:
            radius = min(radius, _module_room(ctx, node.args[0], module, magnitudes, ceiling))
        if node in ctx.roots:
            radius = min(radius, _root_room(ctx, node, magnitudes, ceiling))
    return radius


def _root_room(ctx: _Context, node: Node, magnitudes: dict[Node, float], ceiling: float) -> float:
    """The room a p-th root's sum of p-th powers leaves: each of the source's N entries below
    (T / N)^(1/p), and the output entry, the p-th root of the whole sum (plus a constant: an l2
    pool's eps), below T^(1/p) (see :func:`overflow_radius`)."""
    source = next(a for a in node.all_input_nodes if ctx.is_dependent(a))
    root = ctx.roots[node]
    powers = (ceiling / max(1, _entries(ctx.shapes[source]))) ** (1 / root)
    terms = _room(powers, magnitudes.get(source, 0.0), ctx.bounds[source])
    return min(terms, _room(ceiling ** (1 / root), magnitudes.get(node, 0.0), ctx.bounds[node]))


def _partial_sums_size(ctx: _Context, node: Node, magnitudes: dict[Node, float]) -> float:
    """A size at x = 0 of the values ``node`` computes, its partial sums included, as a linear
    map of each dependent input a plus a constant: its values at x' stay below this + L_n ||x'||.

    An output entry's partial sum (a dot product's prefix, with or without the bias b_j) is at
    most |b_j| + ||w_j|| ||h_a(x')||, the row's dual norm at most the map's norm M <= L_n / L_a
    (every rule is at least linear in each input, :func:`zero_input_scale`); ||h_a(x')|| <=
    ||h_a(0)|| + L_a ||x'||, and |b_j| <= ||h_n(0)|| + M ||h_a(0)||. So the partial sums stay
    below ||h_n(0)|| + 2 M ||h_a(0)|| + L_n ||x'||, where the output alone gives ||h_n(0)||:
    Linear(2, 2) of weights 30 (-1, 1) on (1e37 + x, 1e37) cancels at x = 0, its product
    30 (1e37 + x) overflows from x = 1.35e36, and the class changed there, inside a certified
    radius of 1.41e36. For an operation not linear in a this is larger than needed, never
    smaller; the values a module kept whole computes inside are its own rule's concern."""
    output = magnitudes.get(node, 0.0)
    size, bound = output, ctx.bounds[node]
    for source in node.all_input_nodes:
        source_bound = ctx.bound(source)
        if source_bound > 0:
            map_norm = bound / source_bound * (1 + 2**-50)  # the division's rounding, upward
            size = max(size, output + 2 * map_norm * magnitudes.get(source, 0.0))
    return size


def _node_module(ctx: _Context, node: Node) -> nn.Module | None:
    """The module a node calls on its dependent first argument: a submodule, or the module of a
    functional form (:data:`FUNCTIONAL_MODULES`); None for other nodes."""
    if not node.args or not ctx.is_dependent(node.args[0]):
        return None
    if node.op == "call_module":
        return ctx.gm.get_submodule(node.target)
    if node.op == "call_function" and node.target in FUNCTIONAL_MODULES:
        return _functional_module(ctx, node)
    return None


def _module_room(
    ctx: _Context, source: Node, module: nn.Module, magnitudes: dict[Node, float], ceiling: float
) -> float:
    """The room the values ``module`` computes inside leave its input a (``source``): with
    ||h_a(x')|| <= ||h_a(0)|| + L_a ||x'||, c + g ||h_a(x')|| below the ceiling
    (:func:`internal_growth`) and ||h_a(x')|| below the module's :func:`input_limit` (an entry
    is at most the norm)."""
    size, bound = magnitudes.get(source, 0.0), ctx.bounds[source]
    room = _room(input_limit(module, ceiling), size, bound)
    growth = internal_growth(module, ctx.norm)
    if growth is not None:
        offset, gain = growth
        slack = 1 + 2**-50  # the products' rounding, upward
        room = min(room, _room(ceiling, offset + gain * size * slack, gain * bound * slack))
    return room


def _room(ceiling: float, size_at_zero: float, bound: float) -> float:
    """(ceiling - size_at_zero) / bound, the largest ||x'|| at which size_at_zero + bound ||x'||
    stays below ceiling, rounded down (inf for bound 0 below the ceiling; 0 at or above it)."""
    if not size_at_zero < ceiling:  # NaN included
        return 0.0
    if bound == 0:
        return math.inf
    return math.nextafter((ceiling - size_at_zero) / bound * (1 - 2**-40), 0.0)


def zero_input_scale(ctx: _Context, magnitudes: dict[Node, float], output: Any) -> float:
    """max_n ||h_n(0)|| L / L_n over the input-dependent operations n (L_n: the bound of n's
    output, L: the model's): the size the model's constants (biases, shifts) give the
    intermediate values, carried to the logits. ||h_n(x)|| <= ||h_n(0)|| + L_n ||x||, and L / L_n
    bounds how much of n's output reaches the logits (every rule builds a node's bound from its
    inputs' bounds by monotone maps at least linear in each: L >= L_(n->out) L_n); the L_n ||x||
    parts are the rounding allowance's L ||x|| term, and like it this is a size, the allowance's
    factor covering the operations' count. A bias of 2^24 that the head cancels keeps
    intermediates ~2^24 whatever the logits. A module kept whole counts with what it computes
    inside (:func:`lipcert.bounds.network.internal_size`). inf when an operation with L_n = 0
    holds a nonzero value (its share cannot be bounded) or a value overflowed (a NaN, which
    max() would skip). ``magnitudes``: the sizes at x = 0 (:class:`_ZeroProbe`)."""
    bound, largest = ctx.bound(output), 0.0
    for node, size in magnitudes.items():
        if node.op in ("placeholder", "output") or not ctx.is_dependent(node) or size == 0:
            continue
        term = size * _carried(ctx, node, bound)
        if math.isnan(term):  # an intermediate that overflowed at x = 0 (inf - inf)
            return math.inf
        largest = max(largest, term)
    return largest if math.isfinite(largest) else math.inf
