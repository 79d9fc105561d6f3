"""The ``lipcert`` command line: demo, train, certify, attack, export, bench.

User errors (bad files, configs, shapes) print one ``lipcert: error: ...`` line and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lipcert.certify import certify_batched
from lipcert.checkpoint import CheckpointError, read_checkpoint
from lipcert.config import ConfigError, load_config, parse_config

USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, ConfigError)


def _load_model_and_data(ckpt: str, data_dir: str | None):
    from lipcert.checkpoint import load
    from lipcert.data import load_dataset

    model = load(ckpt)
    _, meta = read_checkpoint(ckpt)
    config = parse_config(meta["config"]) if meta["config"] else None
    dataset = config.data.dataset if config else "digits"
    return model, config, load_dataset(dataset, data_dir or (config.data.data_dir or None))


def cmd_demo(args: argparse.Namespace) -> None:
    from lipcert.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs)


def cmd_train(args: argparse.Namespace) -> None:
    from lipcert.train import train

    config = load_config(args.config)
    if args.device:
        config.device = args.device
    run_dir = Path(args.run_dir or Path("runs") / (config.name or Path(args.config).stem))
    _, history = train(config, run_dir, resume=args.resume)
    print(f"run written to {run_dir} (last epoch: {history[-1] if history else 'none'})")


def cmd_certify(args: argparse.Namespace) -> None:
    from lipcert.certify import certified_accuracy
    from lipcert.report import accuracy_table, plot_certified_curve

    model, config, data = _load_model_and_data(args.checkpoint, args.data_dir)
    norm = args.norm or (config.certify.norm if config else "l2")
    started = time.perf_counter()
    radii = certify_batched(model, data.test.x, data.test.y, norm)
    seconds = time.perf_counter() - started
    acc = certified_accuracy(radii, [0.0, *args.eps])
    print(accuracy_table(acc, norm))
    print(f"{len(radii)} test points certified in {seconds:.2f} s")
    plot = Path(args.plot or Path(args.checkpoint).with_suffix(f".certified_{norm}.png"))
    plot_certified_curve(radii, plot, norm, title=f"{Path(args.checkpoint).parent.name} ({norm})")
    print(f"plot written to {plot}")
    if args.json:
        print(json.dumps({"norm": norm, "accuracy": acc, "seconds": seconds}))


def cmd_attack(args: argparse.Namespace) -> None:
    from lipcert.attacks import pgd
    from lipcert.export import export

    model, config, data = _load_model_and_data(args.checkpoint, args.data_dir)
    norm = args.norm or (config.certify.norm if config else "l2")
    x, y = data.test.x[: args.limit], data.test.y[: args.limit]
    radii = certify_batched(model, x, y, norm)
    plain = export(model)
    for eps in args.eps:
        certified = radii >= eps
        _, success = pgd(plain, x, y, eps, norm, steps=args.steps, restarts=args.restarts,
                         clamp=None)
        broken = int((certified & success).sum())
        print(f"eps={eps:g} ({norm}): certified {certified.float().mean():.2%}, "
              f"empirical robust {(~success).float().mean():.2%}, "
              f"certified points broken: {broken} / {int(certified.sum())}")
        if broken:
            raise SystemExit(f"lipcert: error: {broken} certified points were broken at eps={eps}")


def cmd_export(args: argparse.Namespace) -> None:
    from lipcert.checkpoint import load
    from lipcert.export import export

    model = load(args.checkpoint)
    _, meta = read_checkpoint(args.checkpoint)
    shape = tuple(meta["model_spec"]["kwargs"]["input_shape"])
    plain = export(model, onnx_path=args.onnx, input_shape=shape)
    x = torch.randn(4, *shape)
    diff = (plain(x) - model(x)).abs().max().item()
    print(plain)
    print(f"max |exported - original| on random inputs: {diff:.2e}")
    if args.onnx:
        print(f"ONNX written to {args.onnx}")


def cmd_bench(args: argparse.Namespace) -> None:
    from lipcert.bench import run_bench

    run_bench(args.what, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipcert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train + certify a small net on scikit-learn digits")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config")
    p.add_argument("--run-dir", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/last.safetensors")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the config's device")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (
        ("certify", cmd_certify, "certified accuracy table + PNG curve of a checkpoint"),
        ("attack", cmd_attack, "PGD on certified points: none may be broken"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint")
        p.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 1.58])
        p.add_argument("--norm", choices=("l2", "linf"), help="default: the run's config")
        p.add_argument("--data-dir", help="dataset folder (default: the config's, then search)")
        p.set_defaults(func=func)
    sub.choices["certify"].add_argument("--plot", help="PNG path (default beside the checkpoint)")
    sub.choices["certify"].add_argument("--json", action="store_true", help="also print JSON")
    attack = sub.choices["attack"]
    attack.add_argument("--steps", type=int, default=100)
    attack.add_argument("--restarts", type=int, default=3)
    attack.add_argument("--limit", type=int, default=1000, help="number of test points")

    p = sub.add_parser("export", help="plain torch.nn model (and ONNX) from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--onnx", help="write ONNX here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="benchmarks (ratios to a plain network)")
    p.add_argument("what", choices=("layers",))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"lipcert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
