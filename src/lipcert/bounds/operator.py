"""Sound upper bounds of matrix operator norms.

Power iteration converges to the spectral norm *from below*, so it is never used as a bound here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lipcert.precision import autocast_off, ieee_float32

#: Gram iterations used by default. After t steps the bound exceeds sigma_1 by at most a factor
#: rank^(1/2^t) (Delattre et al., ICML 2023, Thm. 1): 1.0044 for rank 512 at t = 10.
DEFAULT_GRAM_ITERATIONS = 10


def rounding_safety(dtype: torch.dtype, inner_dim: int) -> float:
    """Relative slack covering the rounding of a computation in ``dtype``.

    A floating-point dot product of length n has relative error at most n*u/(1 - n*u) (Higham,
    *Accuracy and Stability of Numerical Algorithms*, eq. 3.5), u the unit roundoff. We allow 4n*u,
    which also covers the few products chained in a Gram step, with a floor of 64u.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    return 1.0 + max(4 * inner_dim, 64) * unit_roundoff


#: The smallest normal float64.
_TINY = torch.finfo(torch.float64).tiny


def power_of_two_scale(tensor: Tensor, dim: tuple[int, ...] | None = None) -> Tensor:
    """The power of two 2^e <= max |entry| < 2^(e+1) (over ``dim``, or all entries), no gradient:
    dividing by it is exact and brings the largest entry into [1, 2), so that norms computed
    afterwards neither under- nor overflow (a bound homogeneous in the tensor is then multiplied
    back by it). Complex tensors: of the largest real or imaginary part (entries then below
    2 sqrt(2); three times cheaper than the complex modulus)."""
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor.resolve_conj())
        dim = (*(d - 1 if d < 0 else d for d in dim), -1) if dim else None
    peak = tensor.abs().amax(dim=dim) if dim else tensor.abs().amax()
    return torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent - 1)


def _frobenius(matrix: Tensor) -> Tensor:
    """Frobenius norm over the last two dims; complex through the real view (CPU: ~40x faster)."""
    if matrix.is_complex():
        return torch.linalg.vector_norm(torch.view_as_real(matrix.resolve_conj()), dim=(-3, -2, -1))
    return torch.linalg.matrix_norm(matrix)


def _divide(matrix: Tensor, scale: Tensor) -> Tensor:
    """``matrix / scale[..., None, None]``, the same roundings; complex through the real view."""
    if matrix.is_complex():
        real = torch.view_as_real(matrix.resolve_conj()) / scale[..., None, None, None]
        return torch.view_as_complex(real)
    return matrix / scale[..., None, None]


def gram_spectral_bound(matrix: Tensor, n_iter: int = DEFAULT_GRAM_ITERATIONS) -> Tensor:
    """Differentiable upper bound of the spectral norm of a matrix or a batch ``(..., m, n)``.

    Gram iteration (Delattre et al., ICML 2023, Alg. 1): G_0 = W, G_{t+1} = G_t^H G_t, and
    sigma_1(W) = sigma_1(G_t)^(1/2^t) <= ||G_t||_F^(1/2^t). Each G_t is rescaled to unit Frobenius
    norm and the scale kept in log space, so nothing overflows. The matrix is first divided by
    :func:`power_of_two_scale` (exact), so that its Frobenius norm neither underflows nor
    overflows (weights ~1e-36 gave a bound 1.2e-6 below the norm).
    Computed in the dtype of ``matrix`` and multiplied by :func:`rounding_safety` for it: TF32 and
    autocast are off (:func:`~lipcert.precision.ieee_float32`; under a bfloat16 autocast a float32
    matrix's products ran in bfloat16, and 6 x 5 Gaussian matrices were bounded 0.35% below).
    """
    if matrix.dim() < 2:
        raise ValueError(f"gram_spectral_bound expects a matrix, got shape {tuple(matrix.shape)}")
    with ieee_float32(), autocast_off(matrix.device):  # also on devices ieee_float32 leaves
        return gram_iteration_bound(matrix, n_iter)


def gram_iteration_bound(matrix: Tensor, n_iter: int) -> Tensor:
    """:func:`gram_spectral_bound`'s computation, in the dtype of ``matrix`` and the arithmetic
    the caller set: for callers already under :func:`~lipcert.precision.ieee_float32` with
    autocast off (:func:`lipcert.bounds.conv.conv2d_operator_bound`, which switched once)."""
    if matrix.shape[-2] < matrix.shape[-1]:  # iterate on the smaller Gram matrix
        matrix = matrix.mH
    power = power_of_two_scale(matrix, dim=(-2, -1))
    log_scale = torch.zeros(matrix.shape[:-2], dtype=matrix.real.dtype, device=matrix.device)
    gram = _divide(matrix, power)
    for _ in range(n_iter):
        frob = _frobenius(gram).clamp_min(torch.finfo(log_scale.dtype).tiny)
        log_scale = 2 * (log_scale + frob.log())
        gram = _divide(gram, frob)
        gram = gram.mH @ gram
    frob = _frobenius(gram).clamp_min(torch.finfo(log_scale.dtype).tiny)
    log_bound = (log_scale + frob.log()) * 2.0**-n_iter  # an int 2^63 overflows the division
    inner = max(matrix.shape[-2], matrix.shape[-1])
    return log_bound.exp() * power * rounding_safety(log_scale.dtype, inner)


def eigen_spectral_bound(matrix: Tensor) -> Tensor:
    """Sound upper bound of the spectral norm of a matrix or a batch ``(..., m, n)``, in float64
    (complex128 for complex input), without autograd: the largest eigenvalue of the smaller Gram
    matrix G = W^H W (LAPACK), sigma_1^2 = lambda_max(G).

    W is first divided by a power of two (exact) that brings its largest entry into [1, 2). With
    k the inner dimension and n the Gram's, the computed Gram differs from G entrywise by at most
    gamma_k (|W|^H |W|)_ij (Higham, eq. 3.5) plus k tiny for products that underflow, so in
    spectral norm by at most gamma_k ||W||_F^2 + n k tiny (its Frobenius norm), which moves
    lambda_max no further (Weyl). LAPACK's symmetric eigenvalues are exact for G_c + E with
    ||E||_2 <= p(n) u ||G_c||_2 for a modest p (LAPACK Users' Guide, 3rd ed., Sec. 4.7); we allow
    the factor 1 + 4 n^2 u of :func:`rounding_safety`. For the 100 x 1568 layer of the LMT CNN this
    takes ~3 ms where the SVD of W took ~10 ms, and the slack is ~1e-11 relative.
    """
    precise = torch.complex128 if matrix.is_complex() else torch.float64
    w = matrix.detach().to(precise)
    if min(w.shape[-2:]) == 0:
        return torch.zeros(w.shape[:-2], dtype=torch.float64, device=w.device)
    if matrix.dtype in MODERATE_DTYPES:  # already moderate: ~0.3 ms of a 100 x 1568 layer's 1.9
        return moderate_spectral_bound(w)
    scale = power_of_two_scale(w, dim=(-2, -1))
    return moderate_spectral_bound(_divide(w, scale)) * scale


#: Dtypes whose values are moderate in float64 (:func:`moderate_spectral_bound`): below 2^128.
MODERATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex32)


def moderate_spectral_bound(w: Tensor) -> Tensor:
    """:func:`eigen_spectral_bound` of a float64 / complex128 matrix or batch whose entries are
    already of moderate size (none above 2^400, so that the Gram cannot overflow), without the
    rescaling: the rounding analysis of :func:`eigen_spectral_bound` holds for any such entries,
    those that underflow included. Values read from :data:`MODERATE_DTYPES` are such entries."""
    wide = w.shape[-2] < w.shape[-1]
    n, k = sorted(w.shape[-2:])  # the Gram is n x n, its entries sums of k products
    frobenius_sq = _frobenius(w).square() * rounding_safety(torch.float64, k * n)
    gram_error = (rounding_safety(torch.float64, k) - 1) * frobenius_sq
    underflow = n * k * _TINY
    gram = w @ w.mH if wide else w.mH @ w  # no conjugate view of w, which would be copied
    squared = hermitian_norm_bound(gram) + gram_error + underflow
    return squared.sqrt() * rounding_safety(torch.float64, 1)


def lapack_eigenvalues(matrix: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of a Hermitian matrix or batch computed on the CPU, whose LAPACK
    (a tridiagonal reduction, then a symmetric tridiagonal solver) has the backward error the
    bounds below rely on; a GPU library may take a Jacobi method (cuSOLVER's batched syevj for
    small matrices), which stops at a tolerance of its own. On ``matrix``'s device."""
    return torch.linalg.eigvalsh(matrix.cpu()).to(matrix.device)


def hermitian_norm_bound(matrix: Tensor) -> Tensor:
    """Sound upper bound of ||H||_2 = max |lambda_i| for a Hermitian (float64 or complex128)
    matrix or batch H, of which LAPACK reads the lower triangle: its computed eigenvalues are
    exact for H + E with ||E||_2 <= p(n) u ||H||_2 (LAPACK Users' Guide, 3rd ed., Sec. 4.7), so
    ||H|| <= max |computed| / (1 - p u); we allow the factor 1 + 4 n^2 u of
    :func:`rounding_safety`. A computed Gram matrix need not be exactly symmetric: its lower
    triangle mirrored is as close to the exact Gram entrywise as the computed entries are."""
    n = matrix.shape[-1]
    largest = lapack_eigenvalues(matrix).abs().amax(dim=-1)
    return largest * rounding_safety(torch.float64, n * n)


def hermitian_max_eigenvalue_bound(matrix: Tensor) -> Tensor:
    """Sound upper bound of lambda_max(H) (signed) for a Hermitian float64 / complex128 matrix
    or batch: the largest computed eigenvalue plus the backward error of
    :func:`hermitian_norm_bound`, p u ||H|| <= (1 + 4 n^2 u - 1) max |computed| / (1 - p u)."""
    n = matrix.shape[-1]
    eigenvalues = lapack_eigenvalues(matrix)
    backward = eigenvalues.abs().amax(dim=-1) * (2 * (rounding_safety(torch.float64, n * n) - 1))
    return eigenvalues[..., -1] + backward


#: Below this size LAPACK's eigenvalues of every matrix cost about what the Cholesky test of
#: :func:`gram_max_eigenvalue_bound` does (per-matrix overhead dominates both).
CHOLESKY_TEST_MIN_SIZE = 8
#: How many matrices of a batch :func:`gram_max_eigenvalue_bound` gives exact eigenvalues to.
EIGEN_CANDIDATES = 2


def shifted_cholesky_bound(batch: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    """Upper bounds of lambda_max(G_b) from the Cholesky factorization of H = fl(shift I - G_b),
    for a batch of Hermitian (float64 / complex128) matrices G_b of which LAPACK reads the lower
    triangles; returns (bounds, failed), ``failed`` where the factorization did not run to
    completion (``bounds`` holds no bound there).

    Where it runs to completion, the computed factor satisfies R^H R = H + dH with
    |dH| <= gamma_(n+1) |R^H| |R| (Higham, *Accuracy and Stability of Numerical Algorithms*,
    Thm. 10.3, for any summation order, blocked LAPACK's included; we allow gamma = 16 (n + 1) u,
    a wide margin over the larger constants of complex arithmetic, Sec. 3.6), so H + dH is
    positive semidefinite and ||dH||_2 <= gamma ||R||_F^2. fl(shift - G_ii) is off by at most
    u H_ii (the off-diagonal entries are exact negations; H_ii > 0 where the factorization
    passes), so lambda_max(G) <= shift + gamma ||R||_F^2 + u max_i H_ii. Theorem 10.3 assumes no
    underflow: a product or quotient that underflows is off by up to u tiny absolutely (Higham
    eq. 2.8; sums are exact there), at most n + 1 of them per entry of dH (the quotient's times
    R_jj, inside gamma's margin where R_jj > 1), so n (n + 1) tiny more covers them: without it,
    8 x 8 Grams of integer multiples of 2^-1074 passed the test with lambda_max two units above
    the bound. The bounds are float64 sums, each rounded once: round the largest one used up.
    The factorization runs on the CPU, whose LAPACK potrf the theorem covers (its exact residuals
    in tests/test_operator_bounds.py); a GPU library's triangular solves may use inverted
    blocks, whose error it does not. Results on ``batch``'s device."""
    n = batch.shape[-1]
    shifted = -batch.cpu()
    shifted.diagonal(dim1=-2, dim2=-1).add_(shift)
    factor, info = torch.linalg.cholesky_ex(shifted)
    gamma = rounding_safety(torch.float64, 4 * (n + 1)) - 1
    diagonal = shifted.diagonal(dim1=-2, dim2=-1).real.amax(dim=-1)  # > 0 where it passed
    eps = torch.finfo(torch.float64).eps
    slack = gamma * _frobenius(factor).square() + diagonal * eps + n * (n + 1) * _TINY
    return (shift + slack).to(batch.device), (info != 0).to(batch.device)


def gram_max_eigenvalue_bound(gram: Tensor) -> float:
    """Sound upper bound of max_b lambda_max(G_b) over a batch of Hermitian (float64 /
    complex128) matrices G_b, of which LAPACK reads the lower triangles, with eigenvalues for a
    few of them only: LAPACK's eigenvalues of a batch of 32 x 32 complex Grams cost ~60 us a
    matrix, a Cholesky factorization ~20.

    The :data:`EIGEN_CANDIDATES` matrices of largest Frobenius norm (>= lambda_max, and close to
    it where one eigenvalue dominates: a ranking only) get
    :func:`hermitian_max_eigenvalue_bound`, whose largest value is the shift mu. Every matrix
    then gets the Cholesky test at mu (:func:`tested_max_eigenvalue_bound`, rounded up); those whose
    factorization fails (an eigenvalue at or above mu) get their eigenvalues. Small matrices (below
    :data:`CHOLESKY_TEST_MIN_SIZE` rows) and small batches get it directly, as do batches with a
    NaN or inf."""
    n = gram.shape[-1]
    batch = gram.reshape(-1, n, n)
    if n < CHOLESKY_TEST_MIN_SIZE or len(batch) <= EIGEN_CANDIDATES:
        return float(hermitian_max_eigenvalue_bound(batch).max())
    sizes = _frobenius(batch)  # >= lambda_max, close to it when one eigenvalue dominates
    if not bool(torch.isfinite(sizes).all()):
        return float(hermitian_max_eigenvalue_bound(batch).max())
    candidates = batch[sizes.topk(EIGEN_CANDIDATES).indices]
    shift = float(hermitian_max_eigenvalue_bound(candidates).max())
    return math.nextafter(tested_max_eigenvalue_bound(batch, (shift,)), math.inf)  # a sum


def tested_max_eigenvalue_bound(batch: Tensor, shifts: Sequence[float]) -> float:
    """max_b lambda_max(G_b) over a batch ``(B, n, n)`` of Hermitian (float64 / complex128)
    matrices, bounded by the Cholesky tests of :func:`shifted_cholesky_bound` at ``shifts`` in
    turn, each for the matrices no earlier one passed, then by
    :func:`hermitian_max_eigenvalue_bound` for those that passed none. The tests' bounds are
    float64 sums rounded to nearest: round the result up for a sound bound."""
    largest = -math.inf
    for shift in shifts:
        if not len(batch):
            break
        bounds, failed = shifted_cholesky_bound(batch, shift)
        if not bool(failed.all()):
            largest = max(largest, float(bounds[~failed].max()))
        batch = batch[failed]
    if len(batch):
        largest = max(largest, float(hermitian_max_eigenvalue_bound(batch).max()))
    return largest


#: From this size on, :func:`defect_max_eigenvalue_bound` tries Cholesky tests before LAPACK's
#: eigenvalues: at 1024 rows a factorization took 23 ms where the eigenvalues took 130 (one thread).
DEFECT_CHOLESKY_MIN_SIZE = 64
#: The most by which :func:`defect_max_eigenvalue_bound` may exceed max_b lambda_max(D_b) where a
#: Cholesky test passes, besides the test's slack (:func:`shifted_cholesky_bound`; at most
#: ~16 n^2 u for D >= -I, 1.9e-9 at 1024 rows): 2^-18 on sigma^2 = 1 + lambda_max(D), so the
#: semi-unitary bound of sigma is at most ~2^-19 (1.9e-6) relative above sigma; float32 weights
#: orthogonal to their precision have lambda_max(D) within ~1e-6 of the largest diagonal entry of D.
DEFECT_TOLERANCE = 2.0**-18


def defect_max_eigenvalue_bound(defect: Tensor) -> float:
    """Sound upper bound of max_b lambda_max(D_b) over a batch of Hermitian (float64 /
    complex128) defects D_b = G_b - I of nearly semi-unitary matrices, finite.

    Below :data:`DEFECT_CHOLESKY_MIN_SIZE` rows: LAPACK's eigenvalues
    (:func:`hermitian_max_eigenvalue_bound`, within 8 n^2 u ||D|| of lambda_max, 3.5e-15 for
    ||D|| = 1e-3 at 63 rows). From it on, the Cholesky tests of :func:`tested_max_eigenvalue_bound`
    at the shifts d + s, d + 4 s and d + 16 s first, the rungs s, 4 s, 16 s at most
    :data:`DEFECT_TOLERANCE`: d the largest diagonal entry of the batch (a lower bound of
    max_b lambda_max(D_b), as lambda_max(D) >= D_ii), s = d or n eps if larger, the scale of the
    rounding noise at the top of D's spectrum (measured on trained layers of float32 weights, 256
    and 1024 wide, Björck and GNP: d 1e-7 to 7e-7, lambda_max(D) 5e-7 to 9e-7). A matrix that
    passes a test is bounded by that shift plus the test's slack, whatever the shift (the
    batch's d: at most the rung plus the slack above max_b lambda_max(D_b), not above the
    matrix's own); the rest get LAPACK's eigenvalues.
    """
    n = defect.shape[-1]
    batch = defect.reshape(-1, n, n)
    if n < DEFECT_CHOLESKY_MIN_SIZE:
        return float(hermitian_max_eigenvalue_bound(batch).max())
    lowest = float(batch.diagonal(dim1=-2, dim2=-1).real.amax())
    step = max(lowest, n * torch.finfo(torch.float64).eps)
    rungs = [rung for rung in (step, 4 * step, 16 * step) if rung <= DEFECT_TOLERANCE]
    bound = tested_max_eigenvalue_bound(batch, [lowest + rung for rung in rungs])
    return math.nextafter(bound, math.inf)  # a sum


def semi_unitary_spectral_bound(q: Tensor) -> float:
    """Sound upper bound, in float64, of max sigma_max(Q) over a batch of nearly semi-unitary Q.

    With G the smaller Gram matrix (Q^H Q or Q Q^H, same nonzero spectrum) and D = G - I,
    sigma_max(Q)^2 = lambda_max(G) = 1 + lambda_max(D): D near 0 is resolved to float64
    precision *relative to D*, where G's own eigenvalues are resolved to u. D is formed in float64
    (complex128 for complex Q) from the exact copy of ``q``; each entry's rounding is at most
    gamma_n (||q_i|| ||q_j|| + |D_ij|) (Higham, eq. 3.5, and Cauchy-Schwarz), so the rounding
    matrix has Frobenius norm at most R = gamma_k (||Q||_F^2 + ||D||_F) plus n k tiny for
    products that underflow (k = max(rows, cols)).

    LAPACK's eigenvalues of D (:func:`hermitian_max_eigenvalue_bound`), plus R by Weyl's
    inequality. One eigen-decomposition gives what two took before (||D||, then W's own Gram
    where sqrt(1 + ||D||) was not close to 1: a trained GNP layer's D is dominated by singular
    values *below* 1, ||D|| = 0.0037 against lambda_max(D) = 8.6e-7).
    Falls back to :func:`eigen_spectral_bound` (which rescales) when D overflows or sigma_max is
    below 1/2, where 1 + lambda_max(D) cancels. From :data:`DEFECT_CHOLESKY_MIN_SIZE` rows on,
    lambda_max(D) comes from Cholesky tests where they pass (:func:`defect_max_eigenvalue_bound`),
    within :data:`DEFECT_TOLERANCE` of it (and the tests' slack, ~16 n^2 u).
    """
    q = q.detach().to(torch.complex128 if q.is_complex() else torch.float64)
    rows, cols = q.shape[-2:]
    gram = q.mH @ q if rows >= cols else q @ q.mH  # (..., n, n), n = min(rows, cols)
    n = gram.shape[-1]
    defect = gram - torch.eye(n, dtype=q.dtype, device=q.device)
    gamma = rounding_safety(torch.float64, max(rows, cols)) - 1
    rounding = gamma * (_frobenius(q) ** 2 + _frobenius(defect)) + n * max(rows, cols) * _TINY
    if not bool(torch.isfinite(rounding).all()):
        return float(eigen_spectral_bound(q).max())
    squared = 1 + defect_max_eigenvalue_bound(defect) + float(rounding.amax())
    if squared < 0.25:  # 1 + lambda_max(D) cancels: the absolute error u is large relative to it
        return float(eigen_spectral_bound(q).max())
    return math.sqrt(squared) * rounding_safety(torch.float64, 1)


#: Entries of the (rows, rows, in_features) difference tensor formed at once (memory cap).
PAIRWISE_CHUNK_ELEMENTS = 2**24


def pairwise_row_distance_bound(weight: Tensor, p: float = 2.0) -> Tensor:
    """Sound float64 upper bounds of ||w_i - w_j||_p (p = 1 or 2) for the rows of ``weight``.

    Direct differences, chunked: never the ||a||^2 + ||b||^2 - 2ab expansion (``torch.cdist``'s
    matrix-product mode), whose cancellation can return 0 for distinct rows. The rows are copied
    exactly to float64; each difference, square, the sum of n terms and the square root round
    with relative error at most (n + 3) u in total (Higham, eq. 3.5), covered by
    :func:`rounding_safety`; squares that underflow lose at most n * tiny, covered by the
    absolute term sqrt(n * tiny).
    """
    if p not in (1.0, 2.0):
        raise ValueError(f"p must be 1 or 2, got {p}")
    weight = weight.detach().double()
    rows, width = weight.shape
    chunk = max(1, PAIRWISE_CHUNK_ELEMENTS // max(1, rows * width))
    dist = torch.cat(
        [
            torch.linalg.vector_norm(
                part[:, None, :] - weight[None], ord=p, dim=-1
            )  # (chunk, rows)
            for part in weight.split(chunk)
        ]
    )
    underflow = math.sqrt(width * torch.finfo(torch.float64).tiny)
    return dist * rounding_safety(torch.float64, width + 3) + underflow
