"""The machinery every constrained layer shares.

* :class:`EvalCache` keeps a value computed from some source tensors (the raw weights) and the
  owner's settings, and hands it back until one of them changes. Changes are detected through each
  tensor's identity (a reference), storage and autograd version counter, which every in-place
  update bumps: optimizer steps, ``load_state_dict`` (``copy_``), ``module.to(...)``, and through
  the owner's plain attributes (:func:`plain_settings`: AOL's ``rescale``, a Cayley layer's grid).
  A tensor whose storage is replaced (``module.to(...)`` and ``.half()`` assign ``param.data``,
  which bumps no version) is seen by its storage address and strides: the cache holds the old
  storage alive, so that a new one cannot come back at its address.
  Fused optimizer steps (``fused=True``) bump no version counter either (torch 2.13):
  :func:`_mark_fused_steps`, a global optimizer post-step hook, bumps them for those optimizers.
  In-place writes through the legacy ``tensor.data`` alias bypass the version counter: the
  layer then keeps computing with its cached values under ``torch.no_grad`` (its bound and
  ``export`` describe those) while a forward with gradients computes afresh; call
  :func:`clear_caches` to use the new ones everywhere (``lipcert.certify`` does so whenever the
  model's values or settings changed since its last bound).
* :class:`WeightConstraint` is the base of the ``torch.nn.utils.parametrize`` modules: its forward
  is the constraint, computed afresh in training mode and cached in eval mode.
* :class:`LipschitzLayer` is the protocol of a lipcert layer: a sound bound of its own Lipschitz
  constant and an export to plain ``torch.nn`` modules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from lipcert.precision import ieee_float32


def _version_key(tensors: Sequence[Tensor]) -> tuple | None:
    """The storage, version counter, dtype, device, shape and strides of each of ``tensors``: a
    key that changes whenever one is modified in place or given other data (their identity is
    checked apart, by reference)."""
    try:
        return tuple(
            (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())
            for t in tensors
        )
    except RuntimeError:  # functorch-wrapped or storage-less tensors: never cache them
        return None


def _mark_fused_steps(optimizer: torch.optim.Optimizer, *_args: Any) -> None:
    """Bump the version counter of every parameter a fused optimizer step just updated: its
    single kernel writes them without doing so (torch 2.13), so an :class:`EvalCache` filled
    before the step kept handing back weights constrained from the old values (an AOL layer
    after one fused SGD step: outputs off by 2.1 in eval mode, its bound and export also of the
    old weights)."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            torch.autograd.graph.increment_version(
                [p for p in group["params"] if not p.is_inference()]
            )


register_optimizer_step_post_hook(_mark_fused_steps)


#: Attribute values :func:`plain_settings` keeps (compared by value).
_PLAIN = (bool, int, float, str, type(None))


def plain_settings(module: nn.Module) -> tuple:
    """(name, value) of ``module``'s plain attributes (numbers, strings, tuples of them): the
    settings a constraint's value depends on besides its tensors, part of an :class:`EvalCache`
    key."""
    return tuple(
        (name, value)
        for name, value in vars(module).items()
        if isinstance(value, _PLAIN)
        or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))
    )


def _identical(held: Sequence[Tensor], sources: Sequence[Tensor]) -> bool:
    """Whether ``sources`` are the very tensors ``held`` (compared by identity)."""
    return len(sources) == len(held) and all(h is t for h, t in zip(held, sources, strict=True))


class _Held(threading.local):
    """What :func:`precomputed_weights` holds in this thread: EvalCache -> (sources, state,
    value), or None outside the block."""

    values: dict | None = None


_HELD = _Held()


class EvalCache:
    """Caches ``compute()`` while the ``sources`` it was computed from and the ``settings`` stay
    unchanged.

    The sources are held and compared by identity: a freed tensor's id and address can be
    reused by a new one at the same version (``torch.func.functional_call`` with fresh
    parameters each call), which an id in the key would take for the old tensor. They are held
    by strong reference, not weak: ``torch.utils.swap_tensors`` refuses a tensor with a weak
    reference, so ``load_state_dict`` and ``.to()`` raised under torch's swap-on-conversion mode
    once the cache was filled. Their storages are held too (detached aliases): a source given new
    data in place of the old (``param.data = ...``, as ``module.half()`` then ``.double()``
    does) had the old one freed, and the new one came back at its address, version, dtype and
    shape (11 of 55 round trips here), its constrained weight then taken from the values before
    the rounding.
    """

    def __init__(self) -> None:
        self._sources: tuple[Tensor, ...] = ()
        self._storages: tuple[Tensor, ...] = ()
        self._key: tuple | None = None
        self._value: Any = None

    def get(
        self,
        sources: Sequence[Tensor],
        compute: Callable[[], Any],
        enabled: bool,
        settings: tuple = (),
    ) -> Any:
        """Return the cached value when ``enabled`` and still valid, else compute it.

        A cached value holds no autograd graph, so the cache is bypassed when gradients must flow
        into the sources (grad mode on and a source requires grad). Inside
        :func:`precomputed_weights` the value is also held, graph and all, and handed back while
        the same sources, versions, settings and grad mode come back.
        """
        held = _HELD.values
        if held is None:
            return self._lookup(sources, compute, enabled, settings)
        state = (_version_key(sources), settings, torch.is_grad_enabled())
        if state[0] is None:  # under a function transform
            return self._lookup(sources, compute, enabled, settings)
        entry = held.get(self)
        if entry is not None and entry[1] == state and _identical(entry[0], sources):
            return entry[2]
        value = self._lookup(sources, compute, enabled, settings)
        held[self] = (tuple(sources), state, value)
        return value

    def _lookup(
        self,
        sources: Sequence[Tensor],
        compute: Callable[[], Any],
        enabled: bool,
        settings: tuple,
    ) -> Any:
        if enabled and torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            enabled = False
        if not enabled:
            return compute()
        versions = _version_key(sources)
        if versions is None:
            return compute()
        key = (versions, settings)
        if key != self._key or not _identical(self._sources, sources):
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
                self._storages = tuple(t.detach() for t in sources)
            self._sources, self._key = tuple(sources), key
        return self._value

    def clear(self) -> None:
        self._sources, self._storages, self._key, self._value = (), (), None, None


class WeightConstraint(nn.Module):
    """Base of lipcert's parametrizations: ``forward(W)`` returns the constrained weight.

    Subclasses implement :meth:`constrain`; this class adds the eval-mode cache.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache = EvalCache()

    def constrain(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        def compute() -> Tensor:
            # TF32 or autocast's bfloat16 would eat the slack of the constraint's proof
            with ieee_float32():
                return self.constrain(weight)

        return self.cache.get([weight], compute, not self.training, plain_settings(self))


def original(module: nn.Module, name: str = "weight") -> Tensor:
    """The unconstrained tensor behind ``module.<name>`` (itself when not parametrized)."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


@contextmanager
def precomputed_weights(model: nn.Module) -> Iterator[None]:
    """Compute every parametrized tensor of ``model`` once, back to back, and hand it out for
    the duration of the context (``torch.nn.utils.parametrize.cached``), and likewise what
    lipcert's other layers derive from their parameters (:meth:`LipschitzLayer.precompute`:
    SLL's folded weights, a Cayley layer's spectrum, held by their :class:`EvalCache`): wrap a
    training step's forward in it.

    The values and gradients are the ones the forward computes without it, bit for bit; what
    changes is when. A layer otherwise computes its constrained weight right before its
    forward, between two convolutions, whose data have by then pushed its code and data out of
    the CPU's caches (the benchmark net's five AOL weights: 5.5 ms inside a step against 2.7 ms
    back to back), and the backward runs each constraint's gradient right after its layer's
    (the autograd engine runs the ready node created last first). Computed before the forward,
    the weights come back to back, and so do their gradients, at the end of the backward. The
    benchmark's train steps (``lipcert bench layers``'s nets, 21 interleaved rounds, two runs):
    AOL(auto) 1.091x -> 1.064x and 1.083x -> 1.059x the plain net, SLL 1.707x -> 1.694x.
    """
    outermost = _HELD.values is None
    if outermost:
        _HELD.values = {}
    try:
        with parametrize.cached():
            for module in model.modules():
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
                elif isinstance(module, LipschitzLayer):
                    module.precompute()
            yield
    finally:
        if outermost:
            _HELD.values = None


def clear_caches(model: nn.Module) -> None:
    """Drop every eval-mode cache in ``model`` (needed only after writes through ``.data``)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, EvalCache):
                value.clear()


class LipschitzLayer:
    """Protocol of a lipcert layer (a mixin beside ``nn.Module``).

    ``lipschitz_bound()`` is a *sound* upper bound, computed in float64 from the weights as they are
    now (including float32 rounding of the constrained weight), of the layer's Lipschitz constant
    in the norm named by ``lipschitz_norm``. ``export()`` returns plain ``torch.nn`` modules (and
    lipcert's stateless activations) computing the same function.
    """

    lipschitz_norm: str = "l2"
    #: True when ``forward`` always returns a newly allocated tensor (never its input or a view
    #: of it): then the graph bound accepts an in-place activation right after the layer
    #: (``lipcert.bounds.inplace``).
    allocates_output: bool = False
    #: p when the output is computed from sums of p-th powers of the input's entries, None if
    #: not: 1 for a sum or an average (its sums may overflow where the output does not:
    #: ``lipcert.bounds.graph.overflow_radius``); p > 1 for their p-th root (an l2 pool: 2): the
    #: powers underflow long before the entries do, and the rounding allowance then resolves
    #: the output to (N tiny)^(1/p) only (``lipcert.bounds.graph.underflow_error``).
    output_root: float | None = None

    def lipschitz_bound(self) -> float:
        raise NotImplementedError

    def export(self) -> nn.Module:
        raise NotImplementedError

    def precompute(self) -> None:
        """Compute what the forward derives from the parameters through an :class:`EvalCache`
        (SLL's folded weights, a Cayley layer's unitary spectrum), which
        :func:`precomputed_weights` then holds for the forward; parametrized weights are
        computed by that function itself. Nothing for layers without such values."""
