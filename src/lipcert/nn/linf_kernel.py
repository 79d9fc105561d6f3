"""Memory-lean l_p distances between inputs and weight rows: u[b, m] = ||x_b - w_m||_p.

This is the operation of an l_inf-distance neuron (Zhang et al., ICML 2021:
u(x) = ||x - w||_inf + b) and of its l_p relaxation used early in training (ibid.).
Naive code broadcasts ``x[:, None, :] - w[None]`` into a (B, M, N) tensor (2.2 GB forward and
backward at B = 128, N = M = 1024); here neither direction holds more than one tile of it, and
autograd saves only (B, M) tensors besides ``x`` and ``w``.

**Tiling.** ``x`` is cut into blocks of rows and ``w`` into chunks of rows; each (block, chunk)
pair is one call of a small kernel written with plain torch ops. With ``torch.compile`` each
kernel is one fused loop that never materializes its (block, chunk, N) difference (tiles sized
for the CPU's L2 cache; on CUDA, Triton kernels on larger tiles). Tiles are zero-padded to fixed
shapes so that a layer compiles once per kernel, whatever the batch size. Without compile (the
fallback: small problems, ``LIPCERT_COMPILE=0``, or a failed compile) the same kernels run eagerly
on tiles of at most :data:`EAGER_TILE_ELEMENTS` differences.

**p = inf.** The forward is max_n |x_n - w_n|. The backward needs only the index n* of the
maximum and s = sign(x_n* - w_n*): du/dx = s e_n*, du/dw = -s e_n*, a scatter-add of O(B M)
work. At a tie the subdifferential of max_n |d_n| is conv{sign(d_n) e_n : n tied} (Clarke; convex
max-of-functions rule); we return one of its vertices, so the gradient is a valid subgradient of
l1 norm 1 (``torch.cdist`` instead gives every tied coordinate the full sign, l1 norm = #ties).
Finding n* with an argmax reduction does not vectorize on CPU (4-6x the cost of an amax,
measured); the compiled kernel instead takes a vectorized max per lane (n = t LANES + j, reduced
over t), picks the best lane, and scans that lane's N / LANES candidates: 2x an amax.

**Finite p.** u = m (sum_n (|d_n| / m)^p)^(1/p) with m = max_n |d_n| (one p = inf pass): the
terms lie in [0, 1], the largest is 1, so the sum S lies in [1, N] and neither overflows nor
underflows even at p = 1024 (a looser scale such as max|x| + max|w| lets every term underflow to
0 at large p). The backward is du/dd_n = sign(d_n) (|d_n| / m)^(p - 1) S^(1/p - 1) (u does not
depend on m), summed over m for dx and over b for dw in one more pass. Powers p = 2^k take k
squarings (compiled once per k); other p take exp(p log t) (about 13x slower on CPU).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

#: Lanes of the two-pass argmax: the first pass reduces LANES columns at once (two AVX-512
#: float32 registers), the second scans N / LANES candidates; at N = 1024, 32 measured 2x the
#: cost of a plain amax, 16 2.7x, a one-pass argmax 4.8x. Any positive value is correct.
LANES = 32
#: Rows of ``x`` and of ``w`` per compiled kernel call. CPU: two 256 x 1024 float32 tiles fill
#: a core's 2 MB L2 (Sapphire Rapids); with the cores shared by other jobs, fewer and larger
#: parallel regions also wait less (256 rows ran 1.4-1.5x faster than 128 under load, 512 no
#: faster). CUDA: large enough to fill the GPU.
COMPILED_TILE_ROWS = {"cpu": 256, "cuda": 1024}
#: Elements of the (block, chunk, N) difference an eager tile may materialize: 2^18 float32 =
#: 1 MB, L2-resident. On the dev CPU, quiet: 2^15..2^17 alike, 2^19 2-4x slower; with the cores
#: shared by another job: 2^18 1.2-2x faster than 2^16 (fewer parallel regions), 2^20 slower.
#: 2^23 = 32 MB on CUDA.
EAGER_TILE_ELEMENTS = {"cpu": 2**18, "cuda": 2**23}
#: Below this many differences (B M N) a call runs eagerly: compiling costs seconds once, and
#: eager tiles are fast enough for small layers.
COMPILE_MIN_WORK = 2**22
#: Largest k for which p = 2^k is computed by squaring (p = 1024).
MAX_SQUARINGS = 10
#: Finite-p terms (|d_n| / m)^p below 2^-60 of the largest (which is 1) are dropped (relative
#: error <= N 2^-60), and so are pair gradients below 2^-60 of the largest: the backward's products
#: then stay >= 2^-120, above float32's smallest normal number 2^-126. Subnormal arithmetic is
#: 10-40x slower on x86 (measured: p = 128 took 39x the time of p = 8 before this flush).
FLUSH_BELOW = 2.0**-60
#: ``LIPCERT_COMPILE``: "0" never compiles, "1" always does, unset / "auto" compiles large calls.
COMPILE_ENV = "LIPCERT_COMPILE"
#: Recompile budget for each kernel: a few tile shapes times the p = 2^k variants.
RECOMPILE_LIMIT = 64

_compile_failed: list[str] = []  # the first compile error, once one happened


# ----------------------------------------------------------------------------------------------
# Kernels: plain torch ops on one (block, chunk) tile. x: (b, N), w: (c, N); per-pair tensors
# (inv_scale, grad) are (b, c). Compiled, each is one fused loop; eager, each materializes tiles.
# ----------------------------------------------------------------------------------------------


def inf_values_kernel(x: Tensor, w: Tensor) -> Tensor:
    """max_n |x_n - w_n| for every pair: (b, c)."""
    return (x[:, None, :] - w[None]).abs().amax(dim=-1)  # (b, c, N) -> (b, c)


def inf_argmax_kernel(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index) of |x_n - w_n| for every pair by a horizontal argmax (the eager path)."""
    return (x[:, None, :] - w[None]).abs().max(dim=-1)  # (b, c, N) -> (b, c), (b, c)


def inf_lane_argmax_kernel(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index) of |x_n - w_n| for every pair in two vectorizable passes (N % LANES == 0).

    With n = t LANES + j: a vertical max over t gives each lane's maximum; the best lane j* is
    picked, then the T = N / LANES candidates n = t LANES + j* are scanned for the first that
    attains it (the same float ops, so the same bits).
    """
    rows, features = x.shape
    out, steps = w.shape[0], features // LANES
    lanes_x = x.view(rows, 1, steps, LANES)  # (b, 1, T, LANES)
    lanes_w = w.view(1, out, steps, LANES)  # (1, c, T, LANES)
    lane_max = (lanes_x - lanes_w).abs().amax(dim=-2)  # (b, c, LANES)
    best, lane = lane_max.max(dim=-1)  # (b, c)
    index = torch.arange(steps, device=x.device) * LANES + lane[..., None]  # (b, c, T)
    x_at = x.gather(1, index.view(rows, out * steps)).view(rows, out, steps)  # (b, c, T)
    w_index = index.transpose(0, 1).reshape(out, rows * steps)  # (c, b T)
    w_at = w.gather(1, w_index).view(out, rows, steps).transpose(0, 1)  # (b, c, T)
    hit = (x_at - w_at).abs() == best[..., None]  # (b, c, T)
    step = hit.to(torch.int32).argmax(dim=-1)  # the first hit
    return best, step * LANES + lane


def _powers(q: Tensor, p: int | Tensor) -> tuple[Tensor, Tensor]:
    """(|q|^p, sign(q) |q|^(p - 1)) for |q| <= 1; ``p`` an int k means p = 2^k (squarings).

    Entries with |q|^p < FLUSH_BELOW are set to 0 first (see :data:`FLUSH_BELOW`).
    """
    if isinstance(p, int):
        q = torch.where(q.abs() < FLUSH_BELOW ** (0.5**p), 0.0, q)
        odd = q  # q^(2^j - 1) for j = 1, ..., k
        square = q * q
        for _ in range(p - 1):
            odd = odd * square
            square = square * square
        return square, odd
    t = q.abs()
    log_t = torch.where(t < torch.exp(math.log(FLUSH_BELOW) / p), 0.0, t).log()  # -inf: 0^p = 0
    grad = torch.where(log_t > -math.inf, torch.exp((p - 1) * log_t), 0.0) * q.sign()
    return torch.exp(p * log_t), grad


def pow_sum_kernel(x: Tensor, w: Tensor, inv_scale: Tensor, p: int | Tensor) -> Tensor:
    """sum_n (|x_n - w_n| / s)^p for every pair: (b, c)."""
    q = (x[:, None, :] - w[None]) * inv_scale[..., None]  # (b, c, N), entries in [-1, 1]
    return _powers(q, p)[0].sum(dim=-1)


def pow_grad_kernel(
    x: Tensor,
    w: Tensor,
    inv_scale: Tensor,
    grad: Tensor,
    p: int | Tensor,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The tile's input gradient sum_m g[b, m] sign(d) (|d| / s)^(p - 1) (b, N) and weight
    gradient -sum_b of the same (c, N), each only when needed (one pass computes both)."""
    q = (x[:, None, :] - w[None]) * inv_scale[..., None]  # (b, c, N)
    term = grad[..., None] * _powers(q, p)[1]  # (b, c, N)
    return (term.sum(dim=1) if need_x else None), (-term.sum(dim=0) if need_w else None)


# ----------------------------------------------------------------------------------------------
# Compilation: on demand, with an eager fallback.
# ----------------------------------------------------------------------------------------------

_COMPILED: dict[Callable, Callable] = {}


def _compiled(kernel: Callable) -> Callable:
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(kernel, dynamic=False, fullgraph=True)
    return _COMPILED[kernel]


def compile_enabled(work: int) -> bool:
    """Whether a call with ``work`` = B M N differences runs compiled kernels."""
    mode = os.environ.get(COMPILE_ENV, "auto").lower()
    if mode == "0" or _compile_failed or torch.compiler.is_compiling():
        return False
    return mode == "1" or work >= COMPILE_MIN_WORK


def _note_compile_failure(err: Exception) -> None:
    _compile_failed.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"lipcert: torch.compile of the l_p distance kernels failed ({_compile_failed[0][:300]}); "
        "using the eager kernels from now on (slower, same results)",
        RuntimeWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------
# Tiling.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiling:
    """How a call is cut: row blocks of x, row chunks of w, and whether kernels are compiled."""

    compiled: bool
    x_rows: int
    w_rows: int
    features: int  # N, padded to a multiple of LANES when compiled

    @staticmethod
    def plan(x: Tensor, w: Tensor) -> _Tiling:
        rows, features = x.shape
        out = w.shape[0]
        device = "cuda" if x.is_cuda else "cpu"
        if compile_enabled(rows * out * features):
            tile = COMPILED_TILE_ROWS[device]
            padded = -(-features // LANES) * LANES
            return _Tiling(
                True, min(tile, _power_of_two(rows)), min(tile, _power_of_two(out)), padded
            )
        budget = EAGER_TILE_ELEMENTS[device]
        x_rows = max(1, min(rows, budget // features))
        w_rows = max(1, min(out, budget // (x_rows * features)))
        return _Tiling(False, x_rows, w_rows, features)

    def kernel(self, eager: Callable, compiled: Callable | None = None) -> Callable:
        return _compiled(compiled or eager) if self.compiled else eager

    def pad(self, t: Tensor, rows: int) -> Tensor:
        """``t`` zero-padded to a multiple of ``rows`` rows and to ``features`` columns (compiled
        tiles have fixed shapes); unchanged when eager. Padded coordinates are 0 in x and w."""
        if not self.compiled:
            return t
        extra_rows = -t.shape[0] % rows
        return F.pad(t, (0, self.features - t.shape[1], 0, extra_rows))

    def tiles(self, x: Tensor, w: Tensor):
        """Yield (x-block slice, w-chunk slice) over the padded operands."""
        for i in range(0, x.shape[0], self.x_rows):
            for j in range(0, w.shape[0], self.w_rows):
                yield slice(i, i + self.x_rows), slice(j, j + self.w_rows)


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n: compiled tile shapes stay few whatever the batch size."""
    return 1 << (n - 1).bit_length()


def _pad_pairs(t: Tensor, rows: int, cols: int) -> Tensor:
    """A (B, M) per-pair tensor zero-padded to (rows, cols)."""
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


# ----------------------------------------------------------------------------------------------
# Forward and backward drivers.
# ----------------------------------------------------------------------------------------------


def _inf_forward(x: Tensor, w: Tensor, plan: _Tiling, with_index: bool):
    """max_n |x_n - w_n| (B, M) and, when ``with_index``, the index of a maximizing n (B, M)."""
    xp, wp = plan.pad(x, plan.x_rows), plan.pad(w, plan.w_rows)
    values = x.new_empty(xp.shape[0], wp.shape[0])
    index = torch.empty(values.shape, dtype=torch.int64, device=x.device) if with_index else None
    if with_index:
        kernel = plan.kernel(inf_argmax_kernel, inf_lane_argmax_kernel)
    else:
        kernel = plan.kernel(inf_values_kernel)
    for rows, cols in plan.tiles(xp, wp):
        if with_index:
            values[rows, cols], index[rows, cols] = kernel(xp[rows], wp[cols])
        else:
            values[rows, cols] = kernel(xp[rows], wp[cols])
    values = values[: x.shape[0], : w.shape[0]]
    if index is not None:  # a padded index appears only at distance 0, where any n is a maximum
        index = index[: x.shape[0], : w.shape[0]].clamp_max(x.shape[1] - 1)
    return values, index


def _inf_sign(x: Tensor, w: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """sign(x[b, n*] - w[m, n*]) for n* = index[b, m]: (B, M), after checking that n* attains
    the maximum (so the gradient is a subgradient whatever the kernel did)."""
    diff = x.gather(1, index) - w.gather(1, index.T).T  # (B, M): x[b, n*] - w[m, n*]
    wrong = (diff.abs() != values) & ~values.isnan()
    if bool(wrong.any()):
        raise RuntimeError("lipcert internal error: an l_inf argmax index misses the maximum")
    return diff.sign()


def _exponent(p: float, like: Tensor) -> int | Tensor:
    """k for p = 2^k (1 <= k <= MAX_SQUARINGS), else p as a 0-dim tensor (one compiled kernel
    serves every such p)."""
    k = round(math.log2(p))
    if 1 <= k <= MAX_SQUARINGS and p == 2.0**k:
        return k
    return torch.tensor(p, dtype=like.dtype, device=like.device)


def _pow_forward(x: Tensor, w: Tensor, p: float, plan: _Tiling):
    """||x_b - w_m||_p (B, M), and the (B, M) tensors the backward needs."""
    exponent = _exponent(p, x)
    scale, _ = _inf_forward(x, w, plan, with_index=False)  # m = max_n |d_n|: the top term is 1
    # Below the smallest normal float 1 / m overflows (inf * 0 = NaN terms): there m is raised to
    # it, the terms stay <= 1 and S may fall below 1 (absolute error < tiny, as any underflow).
    scale = torch.where(scale > 0, scale.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    inv_scale = torch.where(scale > 0, scale.reciprocal(), 0.0)  # (B, M); 0 where x = w
    xp, wp = plan.pad(x, plan.x_rows), plan.pad(w, plan.w_rows)
    inv_padded = _pad_pairs(inv_scale, xp.shape[0], wp.shape[0])
    total = x.new_empty(inv_padded.shape)
    kernel = plan.kernel(pow_sum_kernel)
    for rows, cols in plan.tiles(xp, wp):
        total[rows, cols] = kernel(xp[rows], wp[cols], inv_padded[rows, cols], exponent)
    total = total[: x.shape[0], : w.shape[0]]  # in [1, N] (0 where x = w; below 1 if m < tiny)
    norm = total.pow(1.0 / p)  # (B, M), in [1, N^(1/p)] (idem)
    # du/dd_n = sign(d_n) (|d_n| / m)^(p - 1) S^(1/p - 1); at x = w, 0 is a subgradient
    factor = torch.where(total > 0, norm / total, 0.0)
    return scale * norm, inv_scale, factor


def _pow_backward(x, w, p, plan, inv_scale, pair_grad, need_x, need_w):
    """Input and weight gradients of ||x_b - w_m||_p given pair_grad = dL/du * S^(1/p - 1)."""
    exponent = _exponent(p, x)
    xp, wp = plan.pad(x, plan.x_rows), plan.pad(w, plan.w_rows)
    inv_scale = _pad_pairs(inv_scale, xp.shape[0], wp.shape[0])
    grad_scale = pair_grad.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    pair_grad = pair_grad / grad_scale  # in [-1, 1]; tiny entries flushed (FLUSH_BELOW)
    pair_grad = torch.where(pair_grad.abs() < FLUSH_BELOW, 0.0, pair_grad)
    pair_grad = _pad_pairs(pair_grad, xp.shape[0], wp.shape[0])  # 0 on padded pairs
    grad_x = torch.zeros_like(xp) if need_x else None
    grad_w = torch.zeros_like(wp) if need_w else None
    kernel = plan.kernel(pow_grad_kernel)
    for rows, cols in plan.tiles(xp, wp):
        args = (xp[rows], wp[cols], inv_scale[rows, cols], pair_grad[rows, cols], exponent)
        tile_x, tile_w = kernel(*args, need_x, need_w)
        if need_x:
            grad_x[rows] += tile_x
        if need_w:
            grad_w[cols] += tile_w
    features = x.shape[1]
    return (
        grad_x[: x.shape[0], :features] * grad_scale if need_x else None,
        grad_w[: w.shape[0], :features] * grad_scale if need_w else None,
    )


def _with_fallback(fn: Callable, plan: _Tiling, x: Tensor, w: Tensor):
    """``fn(plan)``; when ``plan`` compiles and compiling fails, ``fn`` on an eager plan."""
    if not plan.compiled:
        return fn(plan)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return fn(plan)
    except Exception as err:  # a missing compiler / Triton, or an inductor bug: fall back
        _note_compile_failure(err)
        return fn(_Tiling.plan(x, w))


class _LpDistance(torch.autograd.Function):
    """u[b, m] = ||x_b - w_m||_p with the tiled forward and backward above."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, p: float) -> Tensor:
        ctx.p = p
        need_grad = any(ctx.needs_input_grad[:2])
        plan = _Tiling.plan(x, w)
        if math.isinf(p):
            values, index = _with_fallback(
                lambda plan: _inf_forward(x, w, plan, with_index=need_grad), plan, x, w
            )
            if need_grad:
                ctx.save_for_backward(index, _inf_sign(x, w, index, values))
                ctx.shapes = (x.shape, w.shape)
            return values
        values, inv_scale, factor = _with_fallback(
            lambda plan: _pow_forward(x, w, p, plan), plan, x, w
        )
        if need_grad:
            ctx.save_for_backward(x, w, inv_scale, factor)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        need_x, need_w = ctx.needs_input_grad[:2]
        if math.isinf(ctx.p):
            index, sign = ctx.saved_tensors
            x_shape, w_shape = ctx.shapes
            signed = grad * sign  # (B, M)
            grad_x = grad_w = None
            if need_x:
                grad_x = signed.new_zeros(x_shape).scatter_add_(1, index, signed)
            if need_w:
                grad_w = signed.new_zeros(w_shape).scatter_add_(1, index.T, -signed.T)
            return grad_x, grad_w, None
        x, w, inv_scale, factor = ctx.saved_tensors
        pair_grad = grad * factor  # (B, M)

        def run(plan: _Tiling):
            return _pow_backward(x, w, ctx.p, plan, inv_scale, pair_grad, need_x, need_w)

        grad_x, grad_w = _with_fallback(run, _Tiling.plan(x, w), x, w)
        return grad_x, grad_w, None


def lp_distance(x: Tensor, w: Tensor, p: float = math.inf) -> Tensor:
    """u[b, m] = ||x_b - w_m||_p for x (B, N) and w (M, N), differentiable, memory-lean.

    ``p`` >= 1 or ``math.inf``. See the module docstring for the algorithm and the gradient at
    ties (p = inf: a valid subgradient).
    """
    if not (p >= 1):
        raise ValueError(f"p must be >= 1 (or math.inf), got {p!r}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"lp_distance expects x (B, N) and w (M, N), got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    return _LpDistance.apply(x.contiguous(), w.contiguous(), float(p))
