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
imports lipcert decides for itself. ``LIPCERT_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere than
glibc (macOS, musl) it does nothing.
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
#: Free memory at the top of the heap kept (the largest value ``mallopt`` takes: never trimmed).
TRIM_THRESHOLD = 2**31 - 1
#: Environment variable that turns :func:`keep_freed_memory` off when set to ``0``.
ENV_SWITCH = "LIPCERT_KEEP_FREED_MEMORY"


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


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (module docstring); True if it took both
    settings. Process-wide and lasting: call it once, in a process that computes."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mapped = any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLDS)
    return mapped and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
