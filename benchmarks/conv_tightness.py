"""Tightness of the size-aware convolution bound on design.md §6's benchmark shapes.

For each convolution of the benchmark net (3x3, "same" zero padding, torch's default init) the
sound bound of :func:`lipcert.bounds.padded_conv.conv_operator_norm` is divided by the exact
operator norm of the zero-padded convolution at its input size. The exact norm of these large
operators (up to 65536 x 65536) is approached from below by ARPACK's Lanczos iteration on
A^T A (scipy, a dependency of scikit-learn; a Ritz value never exceeds the largest eigenvalue), so
the printed ratio is an upper bound of bound / exact. Prints one JSON object per line.

    OMP_NUM_THREADS=1 python benchmarks/conv_tightness.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from lipcert.bounds.padded_conv import conv_operator_norm, module_geometry

#: (c_in, c_out, input side) of the benchmark net's convolutions (design.md §6).
SHAPES = ((3, 64, 32), (64, 64, 32), (256, 128, 16), (128, 128, 16))
#: Lanczos tolerance and subspace size: converged to ~1e-10 relative on these operators.
LANCZOS_TOL, LANCZOS_SUBSPACE = 1e-12, 40


def lanczos_norm(conv: nn.Conv2d, side: int) -> float:
    """A lower bound of the conv's operator norm: sqrt of the top Ritz value of A^T A."""
    weight = conv.weight.detach().double()
    shape = (1, conv.in_channels, side, side)

    def gram(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v)).reshape(shape)
        y = F.conv2d(x, weight, padding=conv.padding)
        back = F.conv_transpose2d(y, weight, padding=conv.padding)  # A^T y
        return back.reshape(-1).numpy()

    size = math.prod(shape)
    operator = LinearOperator((size, size), matvec=gram, dtype=np.float64)
    top = eigsh(operator, k=1, which="LA", tol=LANCZOS_TOL, ncv=LANCZOS_SUBSPACE,
                return_eigenvectors=False)  # fmt: skip
    return math.sqrt(float(top[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    for seed in range(args.seeds):
        for c_in, c_out, side in SHAPES:
            torch.manual_seed(seed)
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).requires_grad_(False)
            started = time.perf_counter()
            bound = conv_operator_norm(conv.weight, module_geometry(conv, (side, side)))
            seconds = time.perf_counter() - started
            lower = lanczos_norm(conv, side)
            print(json.dumps({
                "seed": seed, "c_in": c_in, "c_out": c_out, "side": side, "bound": bound,
                "exact_at_least": lower, "ratio_at_most": bound / lower, "bound_s": seconds,
            }))  # fmt: skip


if __name__ == "__main__":
    main()
