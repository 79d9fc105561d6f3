"""Process-wide torch switches that lipcert sets for a block of work and gives back afterwards.

torch keeps some settings per process, not per thread: the TF32 switches of matrix products and
convolutions (:mod:`lipcert.precision`). A context manager that saves, sets and restores such a
switch on its own breaks when two threads overlap: thread A saves the user's value and sets
lipcert's, thread B then saves lipcert's value, A's exit restores the user's value while B still
computes (B's certificate forward would then run in TF32 on a GPU, outside the float32 rounding
it allows for), and B's exit leaves lipcert's value in place of the user's for good.

:class:`SharedSwitches` counts its holders instead: the first thread in saves the user's values
and sets the switches, later ones (and nested blocks) set them again and count, and the last one
out restores them. A thread outside lipcert that changes a switch while it is held has its change
undone at the next entry and at the restore, as with a single holder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: (object, attribute, value to set) of each switch.
Switch = tuple[object, str, object]


class SharedSwitches:
    """Switches set while at least one thread holds them (:meth:`held`), restored to the values
    they had when the first holder came in once the last one leaves. ``switches`` lists them,
    called at each entry (which switches exist may depend on the torch version)."""

    def __init__(self, switches: Callable[[], list[Switch]]) -> None:
        self._switches = switches
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: list[Switch] = []

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the switches for the block."""
        with self._lock:
            self._set()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    _assign(self._saved)

    def _set(self) -> None:
        """Set the switches, the first holder saving the current values first; on an error (a
        switch torch refuses to change) the first holder restores those already set before it
        propagates. Later holders set them again: a thread outside lipcert may have changed one
        since the first came in (``torch.set_float32_matmul_precision("high")`` in a training
        thread), and a holder that only counted would then certify in TF32."""
        switches = self._switches()
        first = self._holders == 0
        if first:
            self._saved = [(obj, name, getattr(obj, name)) for obj, name, _ in switches]
        try:
            _assign(switches)
        except BaseException:
            if first:
                _assign(self._saved)
            raise


def _assign(switches: list[Switch]) -> None:
    for obj, name, value in switches:
        setattr(obj, name, value)
