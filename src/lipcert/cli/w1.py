"""``lipcert w1 A.npy B.npy``: Wasserstein-1 distance of two point clouds from a 1-Lipschitz net."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lipcert.ot import DEFAULT_LR, DEFAULT_STEPS


def register(sub) -> None:
    p = sub.add_parser(
        "w1",
        help="Wasserstein-1 distance of two point clouds (.npy, shape (n, d)) from a 1-Lip net",
    )
    p.add_argument("a", help="first point cloud: a .npy file of shape (n, d)")
    p.add_argument("b", help="second point cloud: a .npy file of shape (m, d)")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR:g})"
    )
    p.add_argument("--batch-size", type=int, help="points of each cloud a step (default: all)")
    p.add_argument("--seed", type=int, default=0, help="initialization and batches (default 0)")
    p.add_argument("--exact", action="store_true", help="also the exact value (POT; small clouds)")
    p.set_defaults(run=run)


def _load_cloud(path: str):
    """The array of the .npy file ``path``, or an error naming the file (shape and values are
    checked by :func:`lipcert.ot.check_clouds`)."""
    import numpy as np

    if Path(path).is_dir():
        raise IsADirectoryError(f"point cloud {path} is a directory, not a .npy file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"point cloud not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except EOFError as err:  # numpy's error for an empty file
        raise ValueError(f"{path} is empty (0 bytes), not a .npy array") from err
    except ValueError as err:
        raise ValueError(f"{path} is not a .npy array of numbers ({err})") from err
    if not isinstance(array, np.ndarray):  # np.load opens a .npz as an archive of arrays
        array.close()
        raise ValueError(f"{path} is a .npz archive, not a .npy array: save one array with np.save")
    return array


def run(args: argparse.Namespace) -> None:
    import torch

    from lipcert.ot import check_clouds, exact_wasserstein1, wasserstein1

    # float64: the bound is about the points as stored (float32 rounded 1e6 + 0.04 to 1e6 + 1/16)
    x, y = check_clouds(
        _load_cloud(args.a), _load_cloud(args.b), names=(args.a, args.b), dtype=torch.float64
    )
    estimate = wasserstein1(
        x, y, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    print(
        f"W1 estimate: {estimate.distance:.6g} (a lower bound of the empirical W1; potential "
        f"Lipschitz bound {estimate.lipschitz:.7f}; {estimate.steps} steps, "
        f"{estimate.seconds:.1f} s; {len(x)} vs {len(y)} points in {x.shape[1]}-D)"
    )
    if args.exact:
        started = time.perf_counter()
        try:
            exact = exact_wasserstein1(x, y)
        except ImportError as err:  # POT is optional: a one-line error, not a traceback
            raise ValueError(str(err)) from err
        gap = (estimate.distance - exact) / exact if exact > 0 else 0.0
        print(
            f"W1 exact (POT): {exact:.6g} ({time.perf_counter() - started:.1f} s); "
            f"estimate / exact - 1 = {gap:+.2%}"
        )
