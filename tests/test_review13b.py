"""Findings of the review of the thirteenth session's last changes (conv symbol, allocator)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lipcert.bounds.conv import (
    conv2d_operator_bound,
    grid_size,
    grid_twiddles,
    kernel_symbol,
)
from lipcert.bounds.operator import rounding_safety

#: 2 pi in extended precision (numpy's longdouble: a 64-bit mantissa on x86-64).
TWO_PI = np.longdouble("6.283185307179586476925286766559005768")


def _exact_symbol(kernel: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Real and imaginary parts of K^(w) over grid_twiddles' frequencies, in longdouble from the
    same exact integer phases: (c_out c_in, F) each."""
    kh, kw = kernel.shape[-2:]
    n1, n2 = grid
    taps = np.indices((kh, kw)).reshape(2, -1).T
    freqs = np.indices((n1, n2 // 2 + 1)).reshape(2, -1).T
    self_conjugate = (freqs[:, 1] == 0) | (2 * freqs[:, 1] == n2)
    freqs = freqs[~self_conjugate | (freqs[:, 0] <= (-freqs[:, 0]) % n1)]
    phase = ((taps[:, :1] * freqs[:, 0]) % n1 * n2 + (taps[:, 1:] * freqs[:, 1]) % n2 * n1) % (
        n1 * n2
    )
    angles = phase.astype(np.longdouble) * TWO_PI / (n1 * n2)
    flat = kernel.double().reshape(-1, kh * kw).numpy().astype(np.longdouble)
    return flat @ np.cos(angles), -(flat @ np.sin(angles))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "c_out, c_in, size",
    [(1, 1, (2, 2)), (3, 2, (1, 7)), (5, 7, (7, 7)), (64, 48, (3, 3)), (4096, 1, (2, 3))],
)
def test_complex_symbol_entries_stay_within_the_rounding_allowance(dtype, c_out, c_in, size):
    """The symbol is one complex product now, not bit for bit the real products (2 x 2 taps:
    ulps apart): each entry must still be within gamma sum_a |K[o, i, a]| of the exact symbol,
    the per-entry bound behind symbol_rounding, for small and large (other BLAS paths) shapes
    and taps of very different sizes."""
    gen = torch.Generator().manual_seed(c_out + c_in)
    kernel = torch.randn((c_out, c_in, *size), generator=gen, dtype=torch.float64)
    kernel = (kernel * torch.exp(4 * torch.randn(kernel.shape, generator=gen))).to(dtype)
    kernel = kernel / 2.0 ** math.floor(math.log2(float(kernel.abs().max())))  # as the bounds do
    grid = grid_size(size, 0.02)
    symbol = kernel_symbol(kernel, grid_twiddles(size, grid, kernel))  # (F, c_out, c_in)
    computed = symbol.reshape(symbol.shape[0], -1).T.numpy()  # (c_out c_in, F)
    real, imag = _exact_symbol(kernel, grid)
    error = np.maximum(
        np.abs(computed.real.astype(np.longdouble) - real),
        np.abs(computed.imag.astype(np.longdouble) - imag),
    )
    gamma = rounding_safety(dtype, size[0] * size[1] + 1) - 1
    allowance = gamma * np.abs(kernel.double().reshape(c_out * c_in, -1).numpy()).sum(1)
    assert (error <= 0.5 * allowance[:, None]).all()  # measured <= 0.15 of it


def _torch_twiddles(kernel_size, grid, kernel):
    """grid_twiddles as the old code computed its integer phases (in torch)."""
    n1, n2 = grid
    taps = torch.cartesian_prod(*(torch.arange(k) for k in kernel_size)).reshape(-1, 2)
    freqs = torch.cartesian_prod(torch.arange(n1), torch.arange(n2 // 2 + 1)).reshape(-1, 2)
    self_conjugate = (freqs[:, 1] == 0) | (2 * freqs[:, 1] == n2)
    freqs = freqs[~self_conjugate | (freqs[:, 0] <= (-freqs[:, 0]) % n1)]
    phase1 = (taps[:, :1] * freqs[:, 0]) % n1
    phase2 = (taps[:, 1:] * freqs[:, 1]) % n2
    phase = (phase1 * n2 + phase2 * n1) % (n1 * n2)
    angles = phase.double() * (2 * math.pi / (n1 * n2))
    return torch.stack((angles.cos(), angles.sin())).to(kernel.device, kernel.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_phases_give_the_torch_twiddles_bit_for_bit(dtype):
    kernel = torch.zeros(1, dtype=dtype)
    for kh in range(1, 8):
        for kw in (1, 2, kh):
            for grid in [
                (1, 1),
                (1, 2),
                (2, 1),
                (3, 5),
                (8, 8),
                (33, 32),
                grid_size((kh, kw), 0.02),
            ]:
                new = grid_twiddles((kh, kw), grid, kernel)
                assert new.dtype == dtype
                assert torch.equal(new, _torch_twiddles((kh, kw), grid, kernel))


@pytest.mark.parametrize("seed", range(12))
def test_the_differentiable_bound_has_the_no_grad_value_bit_for_bit(seed):
    """The grid maximum's value is the batch's maximum with or without autograd (the recomputed
    maximiser's bound is sometimes an ulp larger, and was taken as the value before), and the
    layer's training bound is its eval bound."""
    gen = torch.Generator().manual_seed(seed)
    c_out, c_in, k = (int(v) for v in torch.randint(1, 9, (3,), generator=gen))
    for dtype in (torch.float32, torch.float64):
        kernel = torch.randn((c_out, c_in, k, k), generator=gen, dtype=torch.float64).to(dtype)
        for stride in (1, 2):
            with torch.no_grad():
                expected = conv2d_operator_bound(kernel, stride)
            weight = kernel.clone().requires_grad_(True)
            bound = conv2d_operator_bound(weight, stride)
            assert torch.equal(bound.detach(), expected)
            (grad,) = torch.autograd.grad(bound, weight)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_symbol_is_differentiable_into_a_real_kernel():
    kernel = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    twiddles = grid_twiddles((2, 3), (5, 6), kernel)
    assert torch.autograd.gradcheck(
        lambda k: torch.view_as_real(kernel_symbol(k, twiddles)), (kernel,)
    )
    assert torch.autograd.gradcheck(lambda k: conv2d_operator_bound(k, 1, 0.3, 4), (kernel,))


# ----------------------------------------------------------------------------------------------
# lipcert.allocator (imported in the tests: the module is newer than some trees these run on).
# ----------------------------------------------------------------------------------------------

#: Allocates three blocks of 720 MiB (2.1 GiB, over 2^31 - 1 bytes: untouched, so no memory is
#: used) from the heap after keep_freed_memory, frees them from the top down, and prints how
#: far the program break went back down (MiB): glibc trims a free heap top above its threshold.
TRIM_PROBE = """
import ctypes
from lipcert.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
assert keep_freed_memory()
size = 720 * 2**20
p1 = libc.malloc(size)
p2 = libc.malloc(size)
p3 = libc.malloc(size)
top = libc.sbrk(0)
libc.free(p3)
libc.free(p2)
libc.free(p1)
print((top - libc.sbrk(0)) // 2**20)
"""


def _glibc() -> bool:
    from lipcert.allocator import _mallopt

    return _mallopt() is not None


@pytest.mark.skipif(not _glibc(), reason="needs glibc's mallopt (Linux)")
def test_keep_freed_memory_never_trims_a_heap_top_over_2_gib():
    """The trim threshold was 2^31 - 1 ("never trimmed"): a heap top of more than 2 GiB free
    went back to the system at a free, to be faulted in again. -1 disables trimming."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("LIPCERT_KEEP_FREED_MEMORY", None)
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True, env=env
    )
    assert int(done.stdout.split()[-1]) < 64  # the break stayed up: nothing handed back


class _Recorder:
    """A stand-in for glibc's mallopt that records its calls and accepts them all."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536"),
    ],
)
def test_keep_freed_memory_leaves_a_malloc_configured_in_the_environment(monkeypatch, name, value):
    """A user who set glibc's thresholds (to hand memory back early, to measure it) had them
    silently overridden by every ``lipcert`` command."""
    from lipcert import allocator

    recorder = _Recorder()
    monkeypatch.setattr(allocator, "_mallopt", lambda: recorder)
    for other in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setenv(name, value)
    assert allocator.keep_freed_memory() is False
    assert recorder.calls == []


def test_keep_freed_memory_sets_both_thresholds_otherwise(monkeypatch):
    from lipcert import allocator

    recorder = _Recorder()
    monkeypatch.setattr(allocator, "_mallopt", lambda: recorder)
    for other in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(allocator.ENV_SWITCH, "1")
    assert allocator.keep_freed_memory() is True
    assert recorder.calls == [(allocator.M_MMAP_THRESHOLD, 2**30), (allocator.M_TRIM_THRESHOLD, -1)]
