"""The `fastinterp` command line: `info`, `demo`, and one sub-command group per method.

This package is the only place that parses flags, picks a matplotlib backend or loads a
model from flags; the methods below it are plain functions.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_GROUPS: tuple[str, ...] = (
    # modules with `register(subparsers)`, each adding its sub-commands
    "fastinterp.cli.info",
    "fastinterp.cli.demo",
    "fastinterp.cli.sith",
    "fastinterp.cli.mutual",
    "fastinterp.cli.ccs",
    "fastinterp.cli.sweep",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinterp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .common import fill_model_defaults

    fill_model_defaults(args)  # notes the model flags given (None = not given), fills the rest
    import matplotlib

    matplotlib.use("Agg")  # commands write figure files; no window, whatever the user's default
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, IndexError, RuntimeError) as err:  # OSError: folders at file paths, ...
        print(f"fastinterp {args.command}: error: {err}", file=sys.stderr)
        return 2
