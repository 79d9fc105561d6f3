"""Certified radii from Lipschitz bounds, with a float-rounding safety.

**l2** (design.md §4). If the logit map f is L-Lipschitz (l2 -> l2), the margin f_y - f_j can
fall by at most sqrt(2) L ||delta|| (the vector e_y - e_j has norm sqrt(2)), so
r(x) = (f_y(x) - max_{j != y} f_j(x)) / (sqrt(2) L) is a certified radius. When the model ends in a
linear layer with rows w_k and the rest of the network (the *body*) is L_b-Lipschitz, the margin
f_y - f_j is (L_b ||w_y - w_j||)-Lipschitz, so r(x) = min_j (f_y - f_j) / (L_b ||w_y - w_j||)
is a tighter radius (Araujo et al. 2023; SLL's ``eval_certified``). Both come from sound bounds
(``lipcert.bounds``), never from an assumed 1.0. Any model torch.fx can trace is bounded
(:mod:`lipcert.bounds.graph`, at the input shape of the certified points, which convolution
bounds depend on); the head form applies whenever the output is a linear layer of the rest.

**l_inf.** In l_inf -> l_inf terms each logit moves by at most L ||delta||_inf, so a margin moves
by at most 2 L ||delta||_inf (l_inf-distance nets: L = 1, r = margin / 2, Zhang et al. 2021); with
a linear head the pair bound is L_b ||w_y - w_j||_1 (Hölder). **Binary** models with one logit f
(class 1 iff f > 0) have margin +-f, moving by at most L ||delta||.

**Norm conversion.** A model bounded only in l2 gets l_inf radii r_2 / sqrt(d)
(||delta||_2 <= sqrt(d) ||delta||_inf); a model bounded only in l_inf gets l2 radii r_inf
(||delta||_inf <= ||delta||_2). Both are sound; the native norm is always tighter.

**Rounding.** Logits are computed in floating point, each off its exact value by some delta.
Bounding the float32 forward error of a whole network tightly is impractical, so we use a
documented a-priori bound, checked against float64 recomputation in the tests:
delta_logit(x) = ROUNDING_REL * (1 + max_k |f_k(x)| + L_b ||x||_2 + Z) for float32 (scaled by
the eps of the least precise dtype among the input, the logits and the model's tensors otherwise:
a float32 model rounds a float64 input), L_b the body bound times max_k ||w_k||_* of a linear
head (each logit reads the body's output through its row w_k, and rows ~1e5 whose logits cancel
round far beyond max |f|): L_b ||x||_2 bounds the part of the intermediate activations that grows
with x, as each logit sees it, and Z (:func:`lipcert.bounds.graph.zero_input_scale`:
max_n ||h_n(0)|| L / L_n, from one forward pass at x = 0) the part the model's constants add,
carried to the logits. Without Z, a bias of 3e4 that a later bias cancels (intermediates ~3e4,
logits ~1) was certified beyond its float32 resolution. An absolute term U
(:func:`lipcert.bounds.graph.underflow_error`) is added for values below the smallest normal
float, which carry no relative precision (subnormal, or flushed to zero where the processor
flushes them; negligible unless a net scales tiny values back up). Certification runs the model
as it is, with autocast and TF32 off (:func:`lipcert.precision.ieee_float32`): the allowance is
for the dtypes of the model's own tensors. A known ``lipschitz`` given to :func:`certify` skips
the graph, and Z, U and the overflow radius R (below) with it. With
delta_m = 2 delta_logit (a margin is a difference of two logits), the radius is
r = (m_computed - 3 delta_m) / L_pair: at any x' with ||x' - x|| <= r the exact margin is
>= 2 delta_m and the computed one >= delta_m > 0, so even a float tie is excluded. A sample with
a non-finite logit (overflow) gets radius 0: the a-priori bound does not cover overflow. Nor may
a value overflow inside the ball: the radius keeps ||x|| + r below the input norm R under which
no value of the forward can overflow (:func:`lipcert.bounds.graph.overflow_radius`; ~1e37 for
ordinary nets, ~1.4e9 for the 4th powers of an LP pool in float32).

**Cache.** The bound is computed once per model state and input shape: the cache keeps copies of
every parameter, buffer and tensor attribute and compares their values (version counters miss
changes made through ``.data`` or a NumPy view), and every module's configuration (class, plain
attributes such as a slope or a stride, hooks), so editing ``negative_slope``, adding a hook or
``p.data.mul_(2)`` recomputes it; tensors the traced graph captured as constants (one held in a
list) are compared by value too. State the forward reads from elsewhere (a global, an attribute
of a plain object, a list element replaced by another tensor) is not seen: after changing it
call :func:`clear_summary_cache`.
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from lipcert.bounds.graph import graph_bound
from lipcert.bounds.network import UnsupportedNorm
from lipcert.bounds.operator import pairwise_row_distance_bound, rounding_safety
from lipcert.losses.base import check_count, check_hyperparameter
from lipcert.modes import eval_mode
from lipcert.nn.constraint import EvalCache, clear_caches
from lipcert.precision import ieee_float32

#: Relative float32 logit error allowed for: 2^-14 ~ 6.1e-5 = 1024 * float32 unit roundoff
#: (2^-24). Measured errors of trained lipcert nets are ~1e-7 relative (tests/test_certify.py).
ROUNDING_REL_FLOAT32 = 2.0**-14
#: Margins pass through (e_y - e_j), whose l2 norm is sqrt(2) (design.md §4, Tsuzuku et al. 2018).
SQRT2 = math.sqrt(2.0)
NORMS = ("l2", "linf")


@dataclass(frozen=True)
class LipschitzSummary:
    """What a certificate needs: bounds in ``norm``, with the last linear layer when known."""

    norm: str  # the input norm the bounds hold in: "l2" or "linf"
    body_bound: float  # the whole model's bound when there is no head
    head_pair_bound: Tensor | None  # (C, C): ||w_i - w_j||_* (dual norm), float64, or None
    zero_input_scale: float = 0.0  # Z of the rounding allowance (module docstring)
    underflow_error: float = 0.0  # U of the rounding allowance (module docstring)
    #: tensors the bound read besides the model's own (constants of the traced graph, such as a
    #: tensor held in a list): the cache compares their values too
    constants: tuple[Tensor, ...] = ()
    #: max_k ||w_k||_* of the head (1 without one): a logit reads the body's output through its
    #: row, so the rounding allowance's L ||x|| term takes body_bound times this
    head_row_bound: float = 1.0
    #: no value of the forward overflows at inputs of norm below it
    #: (:func:`lipcert.bounds.graph.overflow_radius`): radii keep ||x|| + r below it
    overflow_radius: float = math.inf


@dataclass(frozen=True)
class _CachedSummary:
    """A summary with what it was computed from: the model's configuration and copies of its
    tensors."""

    config: tuple
    tensors: tuple[Tensor, ...]
    summary: LipschitzSummary
    constants: tuple[Tensor, ...]  # copies of ``summary.constants`` as they were

    def holds_for(self, config: tuple, tensors: list[Tensor]) -> bool:
        """Same configuration and tensors of the same values (the graph's captured constants
        included). Values are compared, not version counters: an in-place change through
        ``.data`` or a NumPy view bumps no version, and a stale bound would certify radii the
        changed model does not have."""
        return self.config == config and _same_values(
            [*self.tensors, *self.constants], [*tensors, *self.summary.constants]
        )


def _same_values(olds: list[Tensor], news: list[Tensor]) -> bool:
    """Whether each of ``news`` holds the values of its ``olds`` (same dtype, device and shape).
    CPU tensors are compared one by one (NumPy, ~4x faster than ``torch.equal``); the others
    all together, with one wait for each device (a ``torch.equal`` each would wait every time:
    eight waits took ~1 ms of a 3 ms GPU eval pass)."""
    if len(olds) != len(news):
        return False
    flags: dict[torch.device, list[Tensor]] = {}
    for old, new in zip(olds, news, strict=True):
        if old.dtype != new.dtype or old.device != new.device or old.shape != new.shape:
            return False
        new = new.detach().resolve_conj().resolve_neg()
        if new.device.type != "cpu":
            flags.setdefault(new.device, []).append(torch.eq(old, new).all())
        elif new.dtype in _NUMPY_COMPARED:
            if not np.array_equal(old.numpy(), new.numpy()):
                return False
        elif not torch.equal(old, new):
            return False
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())


#: Per model, per (norm, input shape): the cached summary.
_SUMMARIES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _CachedSummary]] = (
    weakref.WeakKeyDictionary()
)
#: Dtypes whose CPU tensors the cache compares with NumPy.
_NUMPY_COMPARED = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)
#: Types of the hook and flag containers every module holds (an empty one keyed by its type).
_HOOK_CONTAINERS = frozenset({dict, OrderedDict, set})
#: Attribute values compared by value in the configuration key (others: :func:`_plain`).
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
#: Module attributes holding the registered tensors: compared by value, their names (and which are
#: None) in the configuration key.
_REGISTERED = frozenset({"_parameters", "_buffers"})
#: Containers compared by type and content.
_CONTAINERS = (dict, list, tuple, set, frozenset)
#: Packages whose code the cache takes by identity (:func:`_is_library_code`).
_LIBRARIES = frozenset({"torch", "lipcert"})
#: Marks a closure cell not filled yet.
_EMPTY_CELL = object()
#: Objects compared by identity only: code (methods, builtins, classes, Python modules) and
#: lipcert's eval caches, derived from the weights that are compared.
_IDENTITY_TYPES = (
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    type,
    EvalCache,
)
#: Dual norm of each input norm: the margin (w_y - w_j) . h moves by ||w_y - w_j||_* ||dh||.
_DUAL_P = {"l2": 2.0, "linf": 1.0}


def _head_pair_bound(weight: Tensor, norm: str) -> Tensor:
    """(C, C) bounds of ||w_i - w_j||_* (dual norm); a binary head's one row w stands for (0, w)."""
    if weight.shape[0] == 1:  # binary head: logits (0, w.h + b), one pair
        weight = torch.cat([torch.zeros_like(weight), weight])
    return pairwise_row_distance_bound(weight, _DUAL_P[norm])


def summarize(
    model: nn.Module,
    norm: str,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype | None = None,
) -> LipschitzSummary:
    """Sound Lipschitz summary of ``model`` (eval mode) on inputs of ``input_shape`` (no batch
    dimension) and ``input_dtype`` (default: the model's): body + linear head when the model ends
    in a linear layer."""
    bounds = graph_bound(model, input_shape, norm, input_dtype)
    graph_terms = (bounds.zero_input_scale, bounds.underflow_error, bounds.constants)
    overflow = bounds.overflow_radius
    if bounds.head is not None:
        weight = bounds.head.weight
        head_pairs = _head_pair_bound(weight, norm)
        rows = _head_row_bound(weight, norm)
        return LipschitzSummary(
            norm,
            bounds.body_bound,
            head_pairs,
            *graph_terms,
            head_row_bound=rows,
            overflow_radius=overflow,
        )
    return LipschitzSummary(norm, bounds.bound, None, *graph_terms, overflow_radius=overflow)


def _head_row_bound(weight: Tensor, norm: str) -> float:
    """max_k ||w_k||_* (dual norm), rounded up: the float rounding of w_k . h grows with
    ||w_k||_* ||h||, which large rows and logits that cancel keep far above max |f| (weights
    ~1e5: radius 4.8e-7 broken at 4.7e-7 while the allowance read the body's bound alone)."""
    rows = torch.linalg.vector_norm(weight.detach().double(), ord=_DUAL_P[norm], dim=1)
    return float(rows.max()) * rounding_safety(torch.float64, weight.shape[1])


def _plain(value: object, tensors: list[Tensor], seen: set[int]) -> object:
    """A comparable stand-in for a module attribute; the tensors met on the way are appended to
    ``tensors`` (compared by value). Numbers, strings, dtypes by value; containers and plain
    objects (their ``vars``, e.g. a ``SimpleNamespace`` or a strategy object read by the forward)
    by type and content, recursively; modules as None (tracked as modules of their own);
    functions, hooks, lipcert's eval caches (derived state) and objects without a ``__dict__`` by
    identity, kept alive by the key (the id first: tuples compare it before the object)."""
    kind = type(value)
    if kind in _HOOK_CONTAINERS and not value:  # most attributes: a module's empty hooks
        return kind
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, Tensor):
        tensors.append(value)
        return Tensor
    if isinstance(value, nn.Module):
        return None
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        # A copy in native byte order: read-only and byte-swapped arrays too.
        tensors.append(torch.tensor(value.astype(value.dtype.newbyteorder("="), copy=False)))
        return np.ndarray
    if isinstance(value, types.FunctionType):
        return _function_state(value, tensors, seen)
    is_container = isinstance(value, _CONTAINERS)
    if isinstance(value, _IDENTITY_TYPES) or not (is_container or hasattr(value, "__dict__")):
        return (id(value), value)
    if id(value) in seen:  # a cycle, or an object reached twice: compared where first met
        return ("seen", id(value))
    seen.add(id(value))
    if not is_container:
        state = _plain(vars(value), tensors, seen)
        return (id(value), value, state, _class_state(type(value), tensors, seen))
    items = value.items() if isinstance(value, dict) else enumerate(value)  # a set: fixed order
    return (kind, tuple((k, _plain(v, tensors, seen)) for k, v in items))


def _function_state(fn: types.FunctionType, tensors: list[Tensor], seen: set[int]) -> object:
    """A function by identity and by what it reads besides its arguments, which a traced graph
    bakes in as constants: its closure's values, its defaults and the globals its code names
    (a forward reading a module-level ``SCALE`` that is changed later). Library code
    (:func:`_is_library_code`) is taken by identity."""
    if _is_library_code(fn):
        return (id(fn), fn)
    if id(fn) in seen:
        return ("seen", id(fn))
    seen.add(id(fn))
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # a cell not filled yet
            cells.append(_EMPTY_CELL)
    names = _names_read(fn.__code__)
    read = [(name, fn.__globals__[name]) for name in names if name in fn.__globals__]
    # Item by item: ``seen`` holds ids of objects alive for the whole traversal, and these
    # lists and tuples are not (a freed one's id is reused by the next).
    return (
        id(fn),
        fn,
        tuple(_plain(v, tensors, seen) for v in cells),
        _plain(fn.__defaults__, tensors, seen),
        _plain(fn.__kwdefaults__, tensors, seen),
        tuple((name, _plain(v, tensors, seen)) for name, v in read),
    )


@functools.cache
def _names_read(code: types.CodeType) -> tuple[str, ...]:
    """The global and attribute names a code object (and the code nested in it) uses."""
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return tuple(dict.fromkeys([*code.co_names, *(n for c in nested for n in _names_read(c))]))


def _is_library_code(code: object) -> bool:
    """Whether a function or class comes with torch, lipcert or Python itself: code whose
    globals are the libraries' own constants, not user state (and whose functions, reached from
    every layer, would cost the cache check ~0.8 ms a call to walk)."""
    return getattr(code, "__module__", None) in (None, "builtins") or (
        code.__module__.partition(".")[0] in _LIBRARIES
    )


def _class_state(cls: type, tensors: list[Tensor], seen: set[int]) -> tuple:
    """The functions of a module's class and its bases outside the libraries
    (:func:`_function_state`): a method may be replaced, or read a global that changes."""
    return tuple(
        _plain(fn, tensors, seen)
        for klass in cls.__mro__
        if not _is_library_code(klass)
        for fn in vars(klass).values()
        if isinstance(fn, types.FunctionType)
    )


def _model_state(model: nn.Module) -> tuple[tuple, list[Tensor]]:
    """What a bound reads besides the input shape: the configuration (every module's class and
    non-tensor attributes, hooks included, with the global forward hooks; which registered
    parameters and buffers are None) and the tensors (parameters, buffers, and tensors held in
    attributes, containers and plain objects), which the cache compares by value."""
    config: list = []
    tensors: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        settings = []
        for name, value in vars(module).items():
            if name in _REGISTERED:  # registered tensors: by value, their names and Nones here
                tensors.extend(v for v in value.values() if v is not None)
                settings.append((name, tuple((k, v is None) for k, v in value.items())))
            elif name == "_modules":  # tracked as modules of their own
                settings.append((name, tuple(value)))
            else:
                settings.append((name, _plain(value, tensors, seen)))
        config.append((type(module), tuple(settings), _class_state(type(module), tensors, seen)))
    hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)
    config.append(_plain(hooks, tensors, seen))
    return tuple(config), tensors


def cached_summary(
    model: nn.Module,
    norm: str,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype | None = None,
) -> LipschitzSummary:
    """:func:`summarize`, computed once per model state (the values of every parameter and
    buffer and every module's configuration: a slope, a stride, a hook; :func:`_model_state`) and
    input shape and dtype."""
    key = (norm, tuple(input_shape), input_dtype)
    config, tensors = _model_state(model)
    caches = _SUMMARIES.setdefault(model, {})
    cached = caches.get(key)
    if cached is None or not cached.holds_for(config, tensors):
        with torch.no_grad(), ieee_float32():
            summary = summarize(model, norm, input_shape, input_dtype)
        copies = tuple(t.detach().clone() for t in tensors)
        constants = tuple(t.detach().clone() for t in summary.constants)
        caches[key] = cached = _CachedSummary(config, copies, summary, constants)
    return cached.summary


def clear_summary_cache(model: nn.Module) -> None:
    """Forget the cached bounds of ``model`` (they are recomputed at the next certify)."""
    _SUMMARIES.pop(model, None)


def native_summary(
    model: nn.Module,
    norm: str,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype | None = None,
) -> LipschitzSummary:
    """The summary in ``norm`` or, when the model is bounded only in the other norm, in that one."""
    try:
        return cached_summary(model, norm, input_shape, input_dtype)
    except UnsupportedNorm as first:
        other = "linf" if norm == "l2" else "l2"
        try:
            return cached_summary(model, other, input_shape, input_dtype)
        except UnsupportedNorm as second:
            raise ValueError(f"cannot bound the model in l2 ({first}) or linf ({second})") from None


def check_points(x: object, *, allow_empty: bool = False) -> None:
    """ValueError naming ``x`` unless it is a floating-point ``torch.Tensor`` batch (B, ...),
    non-empty unless ``allow_empty``."""
    if not torch.is_tensor(x):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or (x.shape[0] == 0 and not allow_empty):
        batch = "a batch" if allow_empty else "a non-empty batch"
        raise ValueError(f"x must be {batch} (B, ...) of inputs, got shape {tuple(x.shape)}")


def check_inputs(x: object, y: object, norm: str, *, allow_empty: bool = False) -> None:
    """ValueError naming the argument unless ``norm`` is one of :data:`NORMS`, ``x`` passes
    :func:`check_points` and ``y`` is a (B,) integer tensor of class ids."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    check_points(x, allow_empty=allow_empty)
    if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', y)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")


def finite_input_norms(x: Tensor) -> Tensor:
    """:func:`input_norm_bound` of each sample, which doubles as the NaN / inf check: a norm is
    finite unless its sample holds a NaN or an inf, or its float sum of squares overflows (then
    the elementwise check decides)."""
    norms = input_norm_bound(x)
    if not torch.isfinite(norms).all() and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values")
    return norms


def _logits(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """The logits of ``x``, computed in batches on ``device`` and gathered on x's device, under
    one :func:`run_model` setting (switching the arithmetic settings for each batch cost ~1.8% of
    an MNIST eval pass on the CPU)."""
    batches = range(0, len(x), batch_size)
    with torch.no_grad(), ieee_float32():
        parts = [_forward(model, x[i : i + batch_size].to(device)).to(x.device) for i in batches]
    return torch.cat(parts)


def logit_rounding_bound(
    logits: Tensor,
    x: Tensor,
    lipschitz: float,
    computed_in: torch.dtype,
    zero_input_scale: float = 0.0,
    underflow_error: float = 0.0,
) -> Tensor:
    """A-priori bound of the rounding error of each sample's logits (see module docstring).

    ``computed_in`` is the dtype the forward pass ran in (the logits may have been upcast since).
    """
    largest = logits.abs().amax(dim=1)
    x_norms = input_norm_bound(x)
    return _rounding_bound(
        largest, x_norms, lipschitz, computed_in, zero_input_scale, underflow_error
    )


def _rounding_bound(
    largest_logit: Tensor,
    x_norms: Tensor,
    lipschitz: float,
    computed_in: torch.dtype,
    zero_input_scale: float,
    underflow_error: float,
) -> Tensor:
    """:func:`logit_rounding_bound` given each sample's max_k |f_k| and bounds of its ||x||_2."""
    rel = rounding_rel(computed_in)
    scale = 1 + zero_input_scale + largest_logit + lipschitz * x_norms.to(largest_logit.dtype)
    return rel * scale + underflow_error


def rounding_rel(computed_in: torch.dtype) -> float:
    """The a-priori relative rounding error of a forward pass in ``computed_in``:
    :data:`ROUNDING_REL_FLOAT32` scaled by that dtype's eps (2^-14 in float32, 2^-43 in float64,
    1/2 in float16)."""
    return ROUNDING_REL_FLOAT32 * torch.finfo(computed_in).eps / torch.finfo(torch.float32).eps


def input_norm_bound(x: Tensor) -> Tensor:
    """Upper bounds of ||x_b||_2, computed in x's own dtype: a float sum of n squares is off by at
    most ~n u relative (u = eps / 2) and the square root halves that, so (1 + (n + 2) eps) covers
    it. Cheaper than converting x to float64."""
    flat = x.detach().flatten(1)
    slack = 1 + (flat.shape[1] + 2) * torch.finfo(flat.dtype).eps
    return torch.linalg.vector_norm(flat, dim=1).double() * slack


def _pair_bounds(summary: LipschitzSummary, num_logits: int, device) -> Tensor:
    """(C, C) Lipschitz bounds of every margin f_i - f_j in ``summary.norm`` (C >= 2).

    ``num_logits`` is the model's own output width: 1 means a binary model whose margin is +-f.
    """
    num_classes = max(2, num_logits)
    if summary.head_pair_bound is not None:
        return summary.head_pair_bound.to(device) * summary.body_bound
    if num_logits == 1:
        factor = 1.0
    else:  # ||e_i - e_j|| in the output's norm: sqrt(2) for l2, 2 (two moving logits) for l_inf
        factor = SQRT2 if summary.norm == "l2" else 2.0
    # float64, as the head's: a float32 tensor rounded 1 + 2^-24 - 2^-40 down to 1, and a float64
    # binary model's radius came out 2^-24 too large, far above its slack of a few delta_m.
    bound = factor * summary.body_bound
    return torch.full((num_classes, num_classes), bound, dtype=torch.float64, device=device)


def predict(logits: Tensor) -> Tensor:
    """Predicted class ids of (B, C) logits; one logit is binary: class 1 iff f > 0."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def radii_from_logits(logits: Tensor, x: Tensor, y: Tensor, summary: LipschitzSummary) -> Tensor:
    """Radii in ``summary.norm`` (<= 0 where misclassified or not certifiable) from logits, with
    the rounding allowance of the less precise of their dtype and the inputs' (pass the logits as
    the forward computed them; :func:`certify` also accounts for the model's own dtype)."""
    computed_in = max(logits.dtype, x.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    radius = _radii(logits, input_norm_bound(x), y, summary, computed_in)
    return _float32_rounded_down(radius)


def _radii(
    logits: Tensor,
    x_norms: Tensor,
    y: Tensor,
    summary: LipschitzSummary,
    computed_in: torch.dtype,
) -> Tensor:
    """:func:`radii_from_logits` given upper bounds of the inputs' l2 norms, in float64.

    r = min_{j != y} (f_y - 3 delta_m - f_j) / L_yj in float64, as a product with the (C, C)
    reciprocals of the pair bounds (a few full-size passes instead of a dozen). The true class's
    own term is excluded by a reciprocal of -inf on the diagonal: (-3 delta_m) * (-inf) = +inf.
    The float64 operations perturb r by a few 2^-53 relative, which moves the margin by far less
    than the one delta_m of slack (delta_m >= 2^-43 m even for float64 logits); the callers'
    cast to float32 rounds down (:func:`_float32_rounded_down`): round-to-nearest could add
    2^-24 relative, more than that slack for float64 logits.
    """
    logits = logits.detach()
    num_logits = logits.shape[1]
    if num_logits == 1:  # binary: class 1 iff f > 0, as logits (0, f)
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    y = y.long()
    largest = logits.abs().amax(dim=1).double()  # exact in any dtype; NaN if a logit is NaN
    delta_margin = 2 * _rounding_bound(
        largest,
        x_norms,
        summary.body_bound * summary.head_row_bound,
        computed_in,
        summary.zero_input_scale,
        summary.underflow_error,
    )
    # A margin <= 0 (misclassified or tied) gives (margin - 3 delta) * (1 / L) < 0: delta > 0.
    shifted_true = logits.gather(1, y[:, None]).double() - 3 * delta_margin[:, None]  # (B, 1)
    reciprocal = _pair_bounds(summary, num_logits, logits.device).clamp_min(1e-300).reciprocal()
    reciprocal.fill_diagonal_(-math.inf)
    per_class = (shifted_true - logits).mul_(reciprocal.index_select(0, y))  # float64
    radius = per_class.amin(dim=1)
    if math.isfinite(summary.overflow_radius):  # no overflow in the ball (module docstring)
        radius = torch.minimum(radius, summary.overflow_radius - x_norms.to(radius))
    # A logit that overflowed (inf / NaN) has no rounding bound: not certified.
    overflow = ~torch.isfinite(largest)
    return radius.masked_fill_(overflow, 0.0)


def _float32_rounded_down(values: Tensor) -> Tensor:
    """float64 ``values`` as the largest float32 numbers not above them."""
    nearest = values.float()
    rounded_up = nearest.double() > values
    return torch.where(rounded_up, torch.nextafter(nearest, nearest.new_tensor(-math.inf)), nearest)


def convert_radius(radius: Tensor, source: str, target: str, input_dim: int) -> Tensor:
    """Radii certified in norm ``source`` as radii in norm ``target`` (sound, see docstring)."""
    if source == "l2" and target == "linf":
        return radius / math.sqrt(input_dim)
    return radius  # same norm, or linf -> l2 (||delta||_inf <= ||delta||_2)


def run_model(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` without gradients in IEEE float32 arithmetic; a model that refuses ``x`` (its
    shape, its dtype: x is never cast) gives a ValueError naming x's shape and the reason."""
    with torch.no_grad(), ieee_float32():
        return _forward(model, x)


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``; a RuntimeError becomes the ValueError of :func:`run_model`."""
    try:
        return model(x)
    except RuntimeError as err:
        shape = tuple(x.shape)
        raise ValueError(f"the model does not accept inputs of shape {shape}: {err}") from err


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str = "l2",
    lipschitz: float | None = None,
) -> Tensor:
    """Per-sample certified radius in ``norm`` around each input; <= 0 means not certified.

    ``lipschitz``: a known Lipschitz constant (in ``norm``) of the whole logit map; by default a
    sound bound of the model (any model torch.fx can trace) is computed once per model state and
    input shape (body + last-layer form when the model ends in a linear layer). A model with one
    logit is binary (class 1 iff f > 0). Costs one forward pass.
    """
    check_inputs(x, y, norm)
    if lipschitz is not None:
        check_hyperparameter("lipschitz", lipschitz, positive=True)
    with eval_mode(model):
        summary = _summary_once(model, norm, x, lipschitz)
        return _certify_with(model, x, y, norm, summary, len(y), x.device)


def _summary_once(
    model: nn.Module, norm: str, x: Tensor, lipschitz: float | None = None
) -> Callable[[], LipschitzSummary]:
    """The model's :func:`native_summary` for inputs of ``x``'s shape and dtype (or the given
    ``lipschitz``): looked up now, before the forward, and computed when missing at the first
    call, after a forward pass has checked that the inputs fit the model (shape errors then name
    the model's layer)."""
    if lipschitz is not None:
        return lambda: LipschitzSummary(norm, float(lipschitz), None)
    input_shape, dtype = tuple(x.shape[1:]), x.dtype
    cached = _SUMMARIES.get(model, {}).get((norm, input_shape, dtype))
    if cached is not None and cached.holds_for(*_model_state(model)):
        return lambda: cached.summary
    # The model changed since its last bound (or has none): its eval caches may hold constrained
    # weights of older raw ones (a write through .data bumps no version), which the forward and
    # the bound would both read while a forward with gradients does not. Recomputed from the raw
    # weights for both; else a bound of the stale weights outlived a later clear_caches.
    clear_caches(model)
    return functools.cache(lambda: native_summary(model, norm, input_shape, dtype))


def _certify_with(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str,
    summary_of_model: Callable[[], LipschitzSummary],
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Radii of ``x`` (model already in eval mode): the forward in batches, the margins and
    their safety for all samples at once (a few dozen small operations, not per batch)."""
    x_norms = finite_input_norms(x)
    logits = _logits(model, x, batch_size, device)
    summary = summary_of_model()
    if logits.dim() != 2:
        raise ValueError(f"certify needs (B, C) logits, the model gave {tuple(logits.shape)}")
    num_classes = max(2, logits.shape[1])
    if bool(((y < 0) | (y >= num_classes)).any()):  # one wait for the device, not two
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    radius = _radii(logits, x_norms, y, summary, forward_dtype(model, x, logits))
    return _float32_rounded_down(convert_radius(radius, summary.norm, norm, x[0].numel()))


def forward_dtype(model: nn.Module, x: Tensor, logits: Tensor) -> torch.dtype:
    """The least precise floating dtype among the input, the logits and the model's parameters
    and buffers: the forward rounds at least that coarsely (a float32 model casting a float64
    input rounds it, and logits may have been upcast since)."""
    floating = {x.dtype, logits.dtype}
    for module in model.modules():  # cheaper than model.parameters() and .buffers()
        for owned in (module._parameters, module._buffers):
            floating.update(t.dtype for t in owned.values() if t is not None)
    floating = {dtype for dtype in floating if dtype.is_floating_point}
    return max(floating, key=lambda dtype: torch.finfo(dtype).eps)


def check_eps(eps: Sequence[float] | Tensor, name: str = "eps") -> list[float]:
    """``eps`` (a sequence of numbers, or a 1-D tensor or array) as a list of floats, each value
    finite and >= 0; ValueError naming ``name`` otherwise."""
    try:
        values = torch.as_tensor(eps, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if isinstance(eps, str | bytes) or values is None or values.dim() != 1:
        raise ValueError(f"{name} must be a list of numbers, got {eps!r}")
    bad = values[~(torch.isfinite(values) & (values >= 0))]
    if len(bad):
        raise ValueError(f"{name} values must be finite and >= 0, got {bad[0].item()}")
    return values.tolist()


def certified_accuracy(radii: Tensor, eps: list[float] | tuple[float, ...]) -> dict[float, float]:
    """Fraction of samples whose radius is at least each eps (eps = 0: clean accuracy)."""
    eps = check_eps(eps)
    if not torch.is_tensor(radii):
        raise ValueError(f"radii must be a torch.Tensor, got {type(radii).__name__}")
    radii = radii.double()  # eps 0.7 in float32 is 0.699999988, which a radius below 0.7 reaches
    return {float(e): float((radii > 0).logical_and(radii >= e).float().mean()) for e in eps}


def certify_batched(
    model: nn.Module, x: Tensor, y: Tensor, norm: str = "l2", batch_size: int = 1000
) -> Tensor:
    """:func:`certify` over a whole dataset in batches of ``batch_size`` on the model's device
    (the bound is computed once)."""
    check_inputs(x, y, norm)
    batch_size = check_count("batch_size", batch_size, 1)
    with eval_mode(model):
        device = next(model.parameters(), x).device  # a model without parameters: x's device
        summary = _summary_once(model, norm, x)
        return _certify_with(model, x, y, norm, summary, batch_size, device).cpu()
