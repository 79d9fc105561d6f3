"""The ``lipcert`` command line. Each subcommand lives in its own module with a ``register``.

User errors (bad files, configs, shapes) print one ``lipcert: error: ...`` line and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from lipcert.checkpoint import CheckpointError
from lipcert.cli import attack, bench, certify, demo, explain, export, lipschitz, train, w1
from lipcert.config import ConfigError

#: Subcommand modules, in the order ``lipcert --help`` lists them.
COMMANDS = (demo, train, certify, lipschitz, attack, export, explain, w1, bench)
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, ConfigError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipcert",
        description="Certifiably robust classifiers from Lipschitz-constrained networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as err:
        print(f"lipcert: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["build_parser", "main"]
