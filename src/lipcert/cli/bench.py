"""``lipcert bench WHAT``: benchmarks printing ratios measured in one run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: ratios to a plain network, measured in one run")
    p.add_argument(
        "what", choices=("layers", "linf", "certify"), help="which benchmark (design.md §6)"
    )
    p.add_argument("checkpoint", nargs="?", help="bench certify: the checkpoint to certify")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to time (default: cpu; bench linf: cuda when available)",
    )
    p.add_argument("--batch", type=int, help="bench layers: batch size (default 64)")
    p.add_argument(
        "--kernel-size", type=int, help="bench layers: the convolutions' size, odd (default 3)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lipcert.bench import run_bench

    run_bench(
        args.what,
        as_json=args.json,
        checkpoint=args.checkpoint,
        device=args.device,
        batch=args.batch,
        kernel_size=args.kernel_size,
    )
