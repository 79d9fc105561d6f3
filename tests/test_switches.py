"""Process-wide switches held by overlapping threads: set while any holds them, the user's
values back once the last one leaves (lipcert.switches)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from lipcert.precision import ieee_float32
from lipcert.switches import SharedSwitches


def _overlap(hold, inside_b):
    """Thread A enters, then B; A leaves while B is inside, where ``inside_b`` is called."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen, errors = [], []

    def a():
        with hold():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        try:
            a_in.wait(5)
            with hold():
                b_in.set()
                a_out.wait(5)
                seen.append(inside_b())
        except Exception as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and a_out.is_set()
    return seen[0]


def test_a_switch_stays_set_until_the_last_thread_leaves_then_the_users_value_is_back():
    flags = SimpleNamespace(fast=True)
    switches = SharedSwitches(lambda: [(flags, "fast", False)])
    assert _overlap(switches.held, lambda: flags.fast) is False
    assert flags.fast is True


def test_nested_blocks_and_errors_restore_the_users_value():
    flags = SimpleNamespace(fast="user")
    switches = SharedSwitches(lambda: [(flags, "fast", "ours")])
    with switches.held():
        with switches.held():
            assert flags.fast == "ours"
        assert flags.fast == "ours"
    assert flags.fast == "user"
    with pytest.raises(KeyError), switches.held():
        raise KeyError("inside")
    assert flags.fast == "user"


class _Refusing:
    """A switch torch refuses to change (as after ``torch.backends.disable_global_flags()``)."""

    value = "user"

    def __setattr__(self, name, value):
        if value != "user":
            raise RuntimeError("not allowed to set this flag")
        super().__setattr__(name, value)


def test_a_refused_switch_restores_those_already_set_and_leaves_no_holder():
    flags, refusing = SimpleNamespace(fast="user"), _Refusing()
    switches = SharedSwitches(lambda: [(flags, "fast", "ours"), (refusing, "value", "ours")])
    with pytest.raises(RuntimeError, match="not allowed"), switches.held():
        pass
    assert flags.fast == "user"
    alone = SharedSwitches(lambda: [(flags, "fast", "ours")])
    with alone.held():
        assert flags.fast == "ours"
    assert flags.fast == "user"


def _tf32() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_overlapping_certificates_keep_tf32_off_and_give_the_users_setting_back():
    """Two threads under ieee_float32: the second's forward must not run in TF32 once the first
    has left (before, A's exit restored TF32 while B computed, and B's exit left IEEE for good)."""
    before = _tf32()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        assert _overlap(ieee_float32, _tf32) == ("ieee", "ieee")
        assert _tf32() == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
