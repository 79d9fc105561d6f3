"""Peer comparison (issue 8): the same MNIST network built from lipcert's, deel-torchlip's and
orthogonium's layers, trained with the same loss for the same wall-clock budget, then certified
by lipcert (sound bounds computed from each model's actual weights) and attacked.

Network: Flatten -> depth x (orthogonal/spectral Linear(width) -> MaxMin) -> unit-row head.

* lipcert:     OrthoLinear (Björck; 15 steps, or "adaptive": stops at convergence, or retraction:
               one Björck step forward, two on the raw weight after each step) ... RowNormLinear
* deel-torchlip: SpectralLinear (spectral + Björck) ... FrobeniusLinear(disjoint_neurons=True)
* orthogonium: OrthoLinear (its default orthogonalizer) ... UnitNormLinear

The activation (lipcert.nn.MaxMin) and the loss (MulticlassHKRLoss) are shared, so only the linear
layers differ. Each library trains whole epochs until the budget is spent (Adam, constant lr).
Certification: lipcert.certify with the last-layer pairwise form on the peers' parametrized
``nn.Linear`` weights (never an assumed 1). Attack: PGD l2 on certified points at each eps.

    OMP_NUM_THREADS=1 python benchmarks/peer_comparison.py --budget 300 [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import nn

import lipcert.nn as lnn
from lipcert.attacks import pgd
from lipcert.certify import certified_accuracy, certify_batched
from lipcert.data import load_dataset
from lipcert.losses import MulticlassHKRLoss
from lipcert.report import format_table

EPS = (0.5, 1.0, 1.58)


def _mlp(
    linear: Callable[[int, int], nn.Module],
    head: Callable[[int, int], nn.Module],
    width: int,
    depth: int,
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    features = 28 * 28
    for _ in range(depth):
        layers += [linear(features, width), lnn.MaxMin()]
        features = width
    return nn.Sequential(*layers, head(width, 10))


def builders() -> dict[str, Callable[[int, int], nn.Sequential]]:
    """Library name -> network factory (width, depth), for the libraries that import."""
    nets = {
        "lipcert": lambda w, d: _mlp(lnn.OrthoLinear, lnn.RowNormLinear, w, d),
        "lipcert (adaptive Björck)": lambda w, d: _mlp(
            lambda i, o: lnn.OrthoLinear(i, o, bjorck_iters="adaptive"), lnn.RowNormLinear, w, d
        ),
        "lipcert (retraction)": lambda w, d: _mlp(
            lambda i, o: lnn.OrthoLinear(i, o, retraction=2), lnn.RowNormLinear, w, d
        ),
    }
    try:
        from deel import torchlip

        nets["deel-torchlip"] = lambda w, d: _mlp(
            torchlip.SpectralLinear,
            lambda i, o: torchlip.FrobeniusLinear(i, o, disjoint_neurons=True),
            w,
            d,
        )
    except ImportError:
        pass
    try:
        from orthogonium.layers import OrthoLinear, UnitNormLinear

        nets["orthogonium"] = lambda w, d: _mlp(OrthoLinear, UnitNormLinear, w, d)
    except ImportError:
        pass
    return nets


def train_for(
    model: nn.Module, data, budget: float, batch: int, lr: float, seed: int
) -> tuple[int, float]:
    """Whole epochs until ``budget`` seconds are spent; returns (epochs, seconds per epoch)."""
    loss_fn = MulticlassHKRLoss(alpha=50.0, margin=1.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lnn.retract_after_steps(optimizer, model)  # acts on OrthoLinear(retraction=k) layers only
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.train.x, data.train.y
    started, epochs = time.perf_counter(), 0
    while time.perf_counter() - started < budget:
        model.train()
        order = torch.randperm(len(y_all), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            optimizer.step()
        epochs += 1
    return epochs, (time.perf_counter() - started) / epochs


def evaluate(model: nn.Module, data, attack_points: int) -> dict[str, float]:
    model.eval()
    radii = certify_batched(model, data.test.x, data.test.y, "l2")
    row = {
        f"cert@{e:g}" if e else "clean": v
        for e, v in certified_accuracy(radii, [0.0, *EPS]).items()
    }
    x, y, r = data.test.x[:attack_points], data.test.y[:attack_points], radii[:attack_points]
    broken = 0
    for eps in EPS:
        _, success = pgd(model, x, y, eps, "l2", steps=100, restarts=3, clamp=None)
        broken += int(((r >= eps) & success).sum())
    row["broken"] = broken
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per library")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--attack-points", type=int, default=500)
    parser.add_argument("--only", nargs="+", help="run only these libraries (names as printed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_dataset("mnist")
    rows = []
    for name, build in builders().items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = build(args.width, args.depth)
        epochs, epoch_seconds = train_for(model, data, args.budget, args.batch, args.lr, seed=0)
        rows.append(
            {"library": name, "epochs": epochs, "epoch_seconds": epoch_seconds}
            | evaluate(model, data, args.attack_points)
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = ("library", "epochs", "s/epoch", "clean", *(f"cert {e:g}" for e in EPS), "broken")
    table = [
        (
            r["library"],
            str(r["epochs"]),
            f"{r['epoch_seconds']:.1f}",
            f"{r['clean']:.2%}",
            *(f"{r[f'cert@{e:g}']:.2%}" for e in EPS),
            str(r["broken"]),
        )
        for r in rows
    ]
    print(format_table(header, table))
    print(
        f"budget {args.budget:g} s per library, width {args.width}, depth {args.depth}, "
        f"batch {args.batch}, lr {args.lr:g}"
    )


if __name__ == "__main__":
    main()
