"""``lipcert bench linf`` (design.md §6; issue 5): the l_inf-distance layer's cost.

One LinfDist-sized problem: batch 128, 1024 -> 1024 features, float32, 2 threads. For p = 8 and
p = inf, forward (no grad) and forward + backward (gradients for x and w, random dL/du), it
measures lipcert's kernels (compiled, and eager with ``LIPCERT_COMPILE=0``), ``torch.cdist``, the
naive broadcast ``(x[:, None] - w[None]).abs()...`` and a same-shape matmul ``x @ w.T`` (the
reference floor).

Each variant is timed in a fresh child process, then measured for memory in another (so memory
left by another variant cannot hide its own), each after a warm-up call (compiles). Every
timing round times the variant and the matmul back to back; the ratio is the median of the
per-round ratios (robust on a shared machine). Peak extra memory is the peak resident memory above
the level before the call (CPU: /proc/self/statm sampled every 0.2 ms, with glibc returning blocks
>= 128 KB to the OS at free; CUDA: the allocator's peak).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lipcert.bench.timing import seconds
from lipcert.report import format_table

BATCH, IN_FEATURES, OUT_FEATURES, THREADS = 128, 1024, 1024, 2
P_VALUES = (8.0, math.inf)
MODES = ("forward", "forward+backward")
VARIANTS = ("matmul", "lipcert", "lipcert eager", "torch.cdist", "naive broadcast")
#: Timed rounds: at least MIN_ROUNDS, more while under ROUND_BUDGET_S seconds (at most MAX).
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S = 3, 11, 20.0
#: Memory sampling period of the CPU measurement (seconds).
SAMPLE_PERIOD_S = 2e-4
#: glibc: serve every block >= 128 KB by mmap and unmap it at free (no dynamic threshold), so
#: resident memory follows what the process holds.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _naive(x: Tensor, w: Tensor, p: float) -> Tensor:
    diff = (x[:, None, :] - w[None]).abs()  # (B, M, N): the tensor lipcert never builds
    return diff.amax(dim=-1) if math.isinf(p) else diff.pow(p).sum(dim=-1).pow(1.0 / p)


def _operation(variant: str) -> Callable[[Tensor, Tensor, float], Tensor]:
    from lipcert.nn.linf_kernel import lp_distance

    return {
        "matmul": lambda x, w, p: x @ w.T,
        "lipcert": lp_distance,
        "lipcert eager": lp_distance,
        "torch.cdist": lambda x, w, p: torch.cdist(x, w, p=p),
        "naive broadcast": _naive,
    }[variant]


def _call(variant: str, p: float, mode: str, device: torch.device) -> Callable[[], None]:
    """A closure running one forward (or forward + backward) of ``variant``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, IN_FEATURES, generator=gen).to(device)
    w = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen).to(device)
    grad = torch.randn(BATCH, OUT_FEATURES, generator=gen).to(device)
    op = _operation(variant)
    if mode == "forward":

        def run() -> None:
            with torch.no_grad():
                op(x, w, p)

        return run
    x.requires_grad_(True)
    w.requires_grad_(True)

    def run_backward() -> None:
        x.grad = w.grad = None
        op(x, w, p).backward(grad)

    return run_backward


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory ``fn`` holds above the level before it ran (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    before, peak, done = _resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(SAMPLE_PERIOD_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], _resident_bytes()) - before)


def measure_variant(variant: str, p: float, mode: str, device: str, what: str) -> dict:
    """``what`` = "time": median ms and median per-round ratio to the matmul; "memory": peak
    extra MB. Measured in this process, after a warm-up call (compiles, caches)."""
    torch.set_num_threads(THREADS)
    dev = torch.device(device)
    run = _call(variant, p, mode, dev)
    seconds(run, dev)
    if what == "memory":
        return {"peak_extra_mb": peak_extra_bytes(run, dev) / 2**20}
    reference = _call("matmul", p, mode, dev)
    times, ratios, started = [], [], time.perf_counter()
    while len(times) < MAX_ROUNDS and (
        len(times) < MIN_ROUNDS or time.perf_counter() - started < ROUND_BUDGET_S
    ):
        ref_s, var_s = seconds(reference, dev), seconds(run, dev)
        times.append(var_s)
        ratios.append(var_s / ref_s)
    return {
        "ms": statistics.median(times) * 1e3,
        "ratio_to_matmul": statistics.median(ratios),
        "rounds": len(times),
    }


def _child(variant: str, p: float, mode: str, device: str, what: str) -> dict:
    """:func:`measure_variant` in a fresh Python process (memory: with :data:`MALLOC_ENV`,
    which slows small allocations, so timing runs without it)."""
    env = dict(os.environ)
    if what == "memory":
        env.update(MALLOC_ENV)
    if variant == "lipcert eager":
        env["LIPCERT_COMPILE"] = "0"
    spec = json.dumps([variant, p, mode, device, what])
    done = subprocess.run(
        [sys.executable, "-m", "lipcert.bench.linf", spec],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(device: str = "cpu") -> list[dict]:
    """One row per (p, mode, variant): time and memory, each from a fresh process."""
    rows = []
    for p in P_VALUES:
        for mode in MODES:
            for variant in VARIANTS:
                row = {"variant": variant, "p": p, "mode": mode}
                for what in ("time", "memory"):
                    row |= _child(variant, p, mode, device, what)
                rows.append(row)
    return rows


def main(as_json: bool = False, device: str | None = None) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(device)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = ("p", "mode", "variant", "median ms", "x matmul", "peak extra MB")
    table = [
        (
            f"{r['p']:g}",
            r["mode"],
            r["variant"],
            f"{r['ms']:.1f}",
            f"{r['ratio_to_matmul']:.1f}",
            f"{r['peak_extra_mb']:.1f}",
        )
        for r in rows
    ]
    print(format_table(header, table))
    print(
        f"LinfDist {IN_FEATURES}->{OUT_FEATURES}, batch {BATCH}, float32, {device}, {THREADS} "
        "threads; x matmul: median per-round ratio to x @ w.T (same mode); each variant in a "
        "fresh process"
    )


if __name__ == "__main__":
    variant_, p_, mode_, device_, what_ = json.loads(sys.argv[1])
    print(json.dumps(measure_variant(variant_, float(p_), mode_, device_, what_)))
