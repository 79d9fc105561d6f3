"""certify's cached bound follows every change of what the model computes (tenth session's review):
after each change below, the cached radius equals a freshly computed one. Each model computes
one logit f(x) = 1 + s x_1 (class 1 when positive), s = 1 before the change and 100 after it: the
stale radius was 100 times the true one, broken by a step inside it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from lipcert.certify import certify, clear_summary_cache


class _Scaled(nn.Module):
    """One logit 1 + s x_1 with s = self.scale() (one per scenario)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + x[:, 1:2] * self.scale()


class InNamespace(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(scale=1.0)

    def scale(self):
        return self.cfg.scale


class InSet(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.flags = {1}

    def scale(self):
        return 100.0 if 2 in self.flags else 1.0


class InList(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.scales = [torch.tensor(1.0)]

    def scale(self):
        return self.scales[0]


class _Holder:
    pass


class InObject(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.holder = _Holder()
        self.holder.t = torch.tensor(1.0)

    def scale(self):
        return self.holder.t


class EmptyKind(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.options: list | dict = []

    def scale(self):
        return 100.0 if isinstance(self.options, dict) else 1.0


class NoneSwap(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fine", torch.tensor(1.0))
        self.register_buffer("coarse", None)

    def scale(self):
        return self.fine if self.fine is not None else 100.0 * self.coarse


class InArray(_Scaled):
    def __init__(self) -> None:
        super().__init__()
        self.factors = np.array([1.0], dtype=">f8")  # byte-swapped: compared all the same

    def scale(self):
        return float(self.factors[0])


SCALE = 1.0  # read by ReadsGlobal's forward (through its method)


class ReadsGlobal(_Scaled):
    def scale(self):
        return SCALE


def _set_global(model: ReadsGlobal) -> None:
    global SCALE
    SCALE = 100.0


def _closure_scale():
    value = [1.0]

    class ReadsClosure(_Scaled):
        def scale(self):
            return value[0]

    return ReadsClosure, value


_ReadsClosure, _CLOSURE_VALUE = _closure_scale()


class MethodReplaced(_Scaled):
    def scale(self):
        return 1.0


def _replace_method(model: MethodReplaced) -> None:
    type(model).scale = lambda self: 100.0


def _swap(model: NoneSwap) -> None:
    model.coarse, model.fine = model.fine, None


CHANGES = {
    "float in a SimpleNamespace": (InNamespace, lambda m: setattr(m.cfg, "scale", 100.0)),
    "element added to a set": (InSet, lambda m: m.flags.add(2)),
    "tensor in a list replaced": (InList, lambda m: m.scales.__setitem__(0, torch.tensor(100.0))),
    "list attribute replaced": (InList, lambda m: setattr(m, "scales", [torch.tensor(100.0)])),
    "tensor in a plain object replaced": (
        InObject,
        lambda m: setattr(m.holder, "t", torch.tensor(100.0)),
    ),
    "empty list -> empty dict": (EmptyKind, lambda m: setattr(m, "options", {})),
    "which buffer is None swapped": (NoneSwap, _swap),
    "NumPy array attribute changed in place": (InArray, lambda m: m.factors.__setitem__(0, 100)),
    "module-level global read by a method": (ReadsGlobal, _set_global),
    "closure value read by a method": (_ReadsClosure, lambda m: _CLOSURE_VALUE.__setitem__(0, 100)),
    "method replaced on the class": (MethodReplaced, _replace_method),
}


@pytest.mark.parametrize("change", CHANGES)
def test_cached_bound_follows_the_change(change):
    build, mutate = CHANGES[change]
    model = build().eval()
    x, y = torch.zeros(1, 2), torch.tensor([1])
    before = certify(model, x, y)
    mutate(model)
    cached = certify(model, x, y)
    clear_summary_cache(model)
    fresh = certify(model, x, y)
    assert float(fresh) < 0.02 < float(before)
    assert torch.equal(cached, fresh)
    step = torch.tensor([[0.0, -0.9 * float(before)]])  # inside the stale radius, not the true one
    assert model(x + step)[0, 0] < 0
