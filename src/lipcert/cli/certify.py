"""``lipcert certify CKPT --eps ...``: certified accuracy table + PNG curve."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lipcert.cli.common import add_eval_arguments, eps_for, load_run


def register(sub) -> None:
    p = sub.add_parser("certify", help="certified accuracy table + PNG curve of a checkpoint")
    add_eval_arguments(p)
    p.add_argument("--plot", help="PNG path (default beside the checkpoint)")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lipcert.certify import certified_accuracy, certify_batched
    from lipcert.report import accuracy_table, figure_path, plot_certified_curve

    model, config, data = load_run(args.checkpoint, args.data_dir, args.device)
    norm = args.norm or config.certify.norm
    eps = eps_for(args.eps, norm, config)
    ckpt = Path(args.checkpoint)
    plot = figure_path(args.plot or ckpt.with_name(f"{ckpt.stem}.certified_{norm}.png"), "--plot")
    started = time.perf_counter()
    radii = certify_batched(model, data.test.x, data.test.y, norm)
    seconds = time.perf_counter() - started
    accuracy = certified_accuracy(radii, [0.0, *eps])
    print(accuracy_table(accuracy, norm))
    print(f"{len(radii)} test points certified in {seconds:.2f} s ({args.device})")
    plot_certified_curve(radii, plot, norm, title=f"{ckpt.parent.name} ({norm})")
    print(f"plot written to {plot}")
    if args.json:
        print(json.dumps({"norm": norm, "accuracy": accuracy, "seconds": seconds}))
