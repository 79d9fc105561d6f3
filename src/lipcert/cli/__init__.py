"""The ``lipcert`` command line. Each subcommand lives in its own module with a ``register``.

User errors (bad files, configs, shapes) print one ``lipcert: error: ...`` line and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from lipcert.allocator import keep_freed_memory
from lipcert.checkpoint import CheckpointError
from lipcert.cli import attack, bench, certify, demo, explain, export, lipschitz, train, w1
from lipcert.config import ConfigError
from lipcert.train import TrainingDiverged

#: Subcommand modules, in the order ``lipcert --help`` lists them.
COMMANDS = (demo, train, certify, lipschitz, attack, export, explain, w1, bench)
#: Errors that are the user's input or environment (a bad value, a missing or unwritable file, a
#: diverged run): one line on stderr and exit code 2, no traceback.
USER_ERRORS = (ValueError, OSError, CheckpointError, ConfigError, TrainingDiverged)
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
#: Exit code when the reader of stdout went away (128 + SIGPIPE), e.g. ``lipcert ... | head``.
BROKEN_PIPE = 141


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
    keep_freed_memory()  # every subcommand computes: no page faults on memory freed and reused
    try:
        args.run(args)
    except BrokenPipeError:  # output piped into head: stop quietly, as shell tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's flush at exit fails otherwise)
        return BROKEN_PIPE
    except USER_ERRORS as err:
        print(f"lipcert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipcert: interrupted (a training run resumes with --resume)", file=sys.stderr)
        return INTERRUPTED
    return 0


__all__ = ["build_parser", "main"]
