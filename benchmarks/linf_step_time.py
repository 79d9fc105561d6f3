"""Seconds per training step of ``linf_dist_net`` on this machine, per width and p.

Used to size a GPU run to a time budget (``benchmarks/gpu_session.sh``): after a warm-up that
compiles the kernels, each (width, p) is timed over a few steps of the real training step
(forward, LinfDistLoss, backward, Adam). Prints one JSON object per line.

    python benchmarks/linf_step_time.py --device cuda --batch 512 --widths 1024 2048
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lipcert.losses import LinfDistLoss
from lipcert.models.registry import build_model
from lipcert.nn.linf import set_p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(width: int, depth: int, batch: int, p: float, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(
        "linf_dist_net", input_shape=[1, 28, 28], num_classes=10, width=width, depth=depth
    ).to(device)
    set_p(model, p)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = LinfDistLoss(hinge_threshold=0.9, ce_scale=8.0, ce_weight=0.5)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # compiles
        step()
    _sync(device)
    started, steps = time.perf_counter(), 5
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024])
    parser.add_argument("--ps", type=float, nargs="+", default=[8.5, math.inf])
    args = parser.parse_args()
    device = torch.device(args.device)
    for width in args.widths:
        for p in args.ps:
            seconds = step_seconds(width, args.depth, args.batch, p, device)
            print(json.dumps({"width": width, "p": p, "batch": args.batch, "seconds": seconds}))


if __name__ == "__main__":
    main()
