"""Wall-clock timing of a call on the CPU or a GPU, for the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the kernels queued on ``device`` (CUDA runs asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``fn()`` takes on ``device``, its queued kernels included."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started
