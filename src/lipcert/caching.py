"""A cache for tensors computed from shapes alone (the row sums' DFT matrices, the conv bound's
grid angles), which keeps only real tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

Result = TypeVar("Result")

#: Entries each cache keeps (one per kernel shape, grid, device and dtype met).
SHAPE_CACHE_SIZE = 128


def shape_cache(fn: Callable[..., Result]) -> Callable[..., Result]:
    """``functools.lru_cache`` of ``fn`` (hashable arguments: shapes, devices, dtypes), whose
    results holding a tracer's tensors are not kept: made under ``torch.export`` (fake tensors),
    a cached value handed every later call outside it garbage (NaN row sums) or a tensor it
    could not read (every later bound raised). Callers must not write into what it returns."""
    cached = functools.lru_cache(maxsize=SHAPE_CACHE_SIZE)(fn)

    @functools.wraps(fn)
    def lookup(*args: object) -> Result:
        result = cached(*args)
        parts = result if isinstance(result, tuple) else (result,)
        if any(isinstance(part, Tensor) and type(part) is not Tensor for part in parts):
            cached.cache_clear()  # a tensor subclass of a tracer
        return result

    lookup.cache_clear = cached.cache_clear
    return lookup
