"""``lipcert lipschitz CKPT``: per-layer sound Lipschitz upper bounds beside empirical lower bounds.

Upper bounds are the ones :func:`lipcert.certify` uses (:mod:`lipcert.bounds.graph`); lower
bounds are the largest Jacobian norms found near random inputs
(:func:`lipcert.lipschitz_lower_bound`, l2 only). Their ratio bounds how much tighter a
certificate could get.
"""

from __future__ import annotations

import argparse
import math

#: Power-iteration and gradient-ascent steps of the empirical lower bounds.
LOWER_POWER_STEPS, LOWER_ASCENT_STEPS = 20, 5


def register(sub) -> None:
    p = sub.add_parser(
        "lipschitz", help="per-layer Lipschitz upper bounds (sound) and empirical lower bounds"
    )
    p.add_argument("checkpoint", help="a lipcert .safetensors checkpoint")
    p.add_argument("--input-shape", type=int, nargs="+", help="no batch dim (default: the model's)")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2")
    p.add_argument("--samples", type=int, default=4, help="random points for the lower bounds")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _input_shape(args: argparse.Namespace, meta: dict) -> tuple[int, ...]:
    """--input-shape, or the one the checkpoint's metadata ``meta`` records."""
    if args.input_shape:
        if any(size <= 0 for size in args.input_shape):
            raise ValueError(f"--input-shape sizes must be > 0, got {args.input_shape}")
        return tuple(args.input_shape)
    shape = meta["model_spec"].get("kwargs", {}).get("input_shape")
    if shape is None:
        raise ValueError("the checkpoint does not record its input shape: give --input-shape")
    return tuple(shape)


def _lower_bound(module, input_shape: tuple[int, ...], args: argparse.Namespace) -> float | None:
    """Empirical l2 lower bound of ``module`` near random inputs (None in l_inf)."""
    from lipcert.bounds import lipschitz_lower_bound
    from lipcert.cli.common import random_inputs

    if args.norm != "l2":
        return None
    x = random_inputs(module, input_shape, args.samples, args.seed)
    return lipschitz_lower_bound(module, x, LOWER_POWER_STEPS, LOWER_ASCENT_STEPS)


def run(args: argparse.Namespace) -> None:
    from lipcert.bounds.graph import graph_bound
    from lipcert.checkpoint import load_with_metadata
    from lipcert.cli.common import check_positive
    from lipcert.report import format_table

    check_positive("--samples", args.samples)
    model, meta = load_with_metadata(args.checkpoint)
    input_shape = _input_shape(args, meta)
    try:
        bounds = graph_bound(model, input_shape, args.norm)
    except TypeError as err:  # no rule for an operation, or untraceable: a user-facing error
        raise ValueError(str(err)) from err
    rows, lowers = [], []
    for node in bounds.nodes:
        lower = None
        if node.module is not None and node.input_shape is not None:
            lower = _lower_bound(node.module, node.input_shape, args)
        lowers.append(lower)
        rows.append((
            node.name, node.op, "x".join(map(str, node.input_shape or ())) or "-",
            "-" if node.factor is None else node.factor, "-" if lower is None else lower,
            node.bound,
        ))  # fmt: skip
    header = ("layer", "type", "input", "upper", "lower (empirical)", "upper up to here")
    print(format_table(header, rows))
    if bounds.nodes and None not in lowers and all(n.factor is not None for n in bounds.nodes):
        print(  # a chain: no layer-by-layer bound can get below the product of the lower bounds
            f"chain of {len(lowers)} layers: product of upper bounds "
            f"{math.prod(n.factor for n in bounds.nodes):.6g}, of lower bounds "
            f"{math.prod(lowers):.6g}"
        )
    upper = bounds.bound
    lower = _lower_bound(model, input_shape, args)
    print(f"network ({args.norm}): sound upper bound {upper:.6g}", end="")
    if lower is None:
        print()
    else:
        ratio = f"{upper / lower:.4g}" if lower > 0 else "n/a (the empirical lower bound is 0)"
        print(f", empirical lower bound {lower:.6g}, ratio {ratio}")
    if bounds.head is not None:
        body = bounds.body_bound
        print(f"before the linear head: {body:.6g} (certify pairs it with the head's rows)")
