"""``lipcert train CONFIG``: train from a TOML config (progress, checkpoints, resume)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipcert.config import ConfigError
from lipcert.train import RESUMABLE_KEYS


def register(sub) -> None:
    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config", help="a TOML config (see configs/)")
    p.add_argument("--run-dir", help="output folder (default runs/<config name>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from run-dir/last.safetensors, with the run's config: only "
        f"{', '.join(sorted(RESUMABLE_KEYS))} may change",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the config's device")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set epochs=5 --set model.kwargs.width=32 "
        "(TOML values; repeatable; saved in the run's resolved config)",
    )
    p.set_defaults(run=run)


def default_run_dir(name: str) -> Path:
    """``runs/<name>``; ConfigError unless ``name`` is one plain folder name: an absolute path
    or a ``..`` would write the run's files (over a config.json already there) outside runs/."""
    if name in ("", "..") or Path(name).name != name:
        raise ConfigError(
            f"name = {name!r} is not one folder name under runs/ (no '/', not '' or '..'): "
            "choose a plain name, or give the run folder with --run-dir"
        )
    return Path("runs") / name


def run(args: argparse.Namespace) -> None:
    from lipcert.config import load_config
    from lipcert.train import train

    config = load_config(args.config, args.overrides)
    if args.device:
        config.device = args.device
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config.name)
    _, history = train(config, run_dir, resume=args.resume)
    print(f"run written to {run_dir}; last epoch: {history[-1] if history else 'none'}")
