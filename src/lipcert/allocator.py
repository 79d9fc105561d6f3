"""Keep freed memory in the process (glibc's malloc), so that training steps stop faulting it in.

glibc hands memory back to the system in two ways: a block above its mmap threshold (adjusted on
the fly, 32 MiB at most by default) is unmapped when freed, and free memory at the top of the heap
beyond its trim threshold is released. A training or evaluation loop allocates tensors of the
same sizes at every step, so each step then writes to fresh pages, and every first write to a
4 KiB page is a page fault (1.4-1.5 us here). Measured on this machine (2 threads, the net of
``lipcert bench layers``, plain Conv2d + ReLU, one train step): batch 256, 1675 ms with 484,000
faults per step, 1146 ms with none after :func:`keep_freed_memory`; batch 64, 318-355 ms with
18,000-53,000 faults, 295 ms with none. The price: the process keeps its peak memory (maxrss
1003 MB instead of 782 MB at batch 256) until it exits.

The ``lipcert`` command applies it to its own process (every subcommand computes); a script that
imports lipcert decides for itself. ``LIPCERT_KEEP_FREED_MEMORY=0`` turns it off, and a malloc
configured in the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, or their
``GLIBC_TUNABLES``) is left as configured. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks from this size on are still mapped on their own (1 GiB; glibc versions that cap the
#: threshold at 32 MiB get that instead).
MMAP_THRESHOLDS = (2**30, 2**25)
#: Free memory at the top of the heap kept: -1 disables trimming completely (``man mallopt``; the
#: largest positive value, 2^31 - 1, still let a heap top of over 2 GiB free go back at a free).
TRIM_THRESHOLD = -1
#: Environment variable that turns :func:`keep_freed_memory` off when set to ``0``.
ENV_SWITCH = "LIPCERT_KEEP_FREED_MEMORY"
#: glibc's own settings of the two thresholds (environment variables, tunables): the user's choice.
GLIBC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
GLIBC_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where there is none (not Linux, no C library found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _configured_by_user() -> bool:
    """Whether the environment sets glibc's trim or mmap threshold (read by glibc at start-up;
    a ``mallopt`` would silently override it)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in GLIBC_SETTINGS) or any(
        name in tunables for name in GLIBC_TUNABLES
    )


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (module docstring); True if it took both
    settings. Process-wide and lasting: call it once, in a process that computes. Nothing is
    changed under ``LIPCERT_KEEP_FREED_MEMORY=0`` or where the environment configures glibc's
    thresholds itself (``MALLOC_TRIM_THRESHOLD_=131072``, say, to hand memory back early)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or _configured_by_user():
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mapped = any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLDS)
    return mapped and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
