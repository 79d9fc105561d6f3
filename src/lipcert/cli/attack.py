"""``lipcert attack CKPT --eps ...``: PGD on the certified points; none may be broken."""

from __future__ import annotations

import argparse

from lipcert.cli.common import add_eval_arguments, check_positive, eps_for, load_run


def register(sub) -> None:
    p = sub.add_parser("attack", help="PGD with restarts on certified points: none may be broken")
    add_eval_arguments(p)
    p.add_argument("--steps", type=int, default=100, help="PGD steps (default 100)")
    p.add_argument("--restarts", type=int, default=3, help="random restarts (default 3)")
    p.add_argument("--limit", type=int, default=1000, help="test points attacked (default 1000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lipcert.attacks import pgd
    from lipcert.certify import certify_batched
    from lipcert.export import export

    for option in ("steps", "restarts", "limit"):
        check_positive(f"--{option}", getattr(args, option))
    model, config, data = load_run(args.checkpoint, args.data_dir, args.device)
    norm = args.norm or config.certify.norm
    eps_values = eps_for(args.eps, norm, config)
    x, y = data.test.x[: args.limit], data.test.y[: args.limit]
    radii = certify_batched(model, x, y, norm)
    plain = export(model)
    x, y = x.to(args.device), y.to(args.device)
    total_broken = 0
    for eps in eps_values:
        certified = radii >= eps
        _, success = pgd(plain, x, y, eps, norm, steps=args.steps, restarts=args.restarts)
        success = success.cpu()
        broken = int((certified & success).sum())
        total_broken += broken
        print(
            f"eps={eps:g} ({norm}): certified {certified.float().mean():.2%} <= empirical robust "
            f"{(~success).float().mean():.2%}; certified points broken: {broken} of "
            f"{int(certified.sum())}"
        )
    if total_broken:
        raise ValueError(f"{total_broken} certified points were broken: a certificate is unsound")
