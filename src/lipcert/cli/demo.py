"""``lipcert demo``: train + certify a small SLL net on scikit-learn digits."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="train + certify a small net on scikit-learn digits (< 1 min)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lipcert.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs)
