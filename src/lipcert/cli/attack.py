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
    p.add_argument(
        "--tightness",
        action="store_true",
        help="also search each certified point's smallest adversarial distance (PGD bisection: "
        "--steps steps, one start per eps tried; --restarts applies to the fixed-eps attacks) "
        "and print the distribution of distance / certified radius",
    )
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
    if args.tightness:
        total_broken += _tightness(plain, x, y, radii, norm, args.steps)
    if total_broken:
        raise ValueError(f"{total_broken} certified points were broken: a certificate is unsound")


#: Quantiles of distance / radius printed by ``--tightness``.
TIGHTNESS_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
#: The search starts at twice the radius and doubles this many times where nothing is found.
TIGHTNESS_DOUBLINGS = 3


def _tightness(plain, x, y, radii, norm: str, steps: int) -> int:
    """Prints the distribution of (smallest adversarial distance found) / (certified radius)
    over the points with a positive radius; returns how many broke (distance < radius)."""
    import torch

    from lipcert.attacks import minimal_adversarial_distance

    certified = radii > 0
    radius = radii[certified].to(x.device)
    if len(radius) == 0:
        print("tightness: no certified point")
        return 0
    index = certified.nonzero()[:, 0].to(x.device)
    distance = minimal_adversarial_distance(
        plain, x[index], y[index], 2 * radius, norm, steps, doublings=TIGHTNESS_DOUBLINGS
    )
    ratio = (distance / radius).cpu()
    found = torch.isfinite(ratio)
    broken = int((ratio < 1).sum())
    values = ratio[found].double().quantile(torch.tensor(TIGHTNESS_QUANTILES, dtype=torch.float64))
    spread = ", ".join(
        f"{q:.0%} {v:.3f}" for q, v in zip(TIGHTNESS_QUANTILES, values.tolist(), strict=True)
    )
    print(
        f"tightness ({norm}, attack distance / certified radius) over {int(found.sum())} of "
        f"{len(ratio)} certified points: {spread}; none found within {2 << TIGHTNESS_DOUBLINGS} r: "
        f"{int((~found).sum())}; certified points broken: {broken} of {len(ratio)}"
    )
    return broken
