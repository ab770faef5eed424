"""The ``compact-hooks`` command: parses the command line and dispatches to the module of each subcommand.

Each subcommand lives next to what it drives and registers itself with ``add_parser(subparsers)``
(``set_defaults(handler=...)``); only the chosen subcommand's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

# subcommand -> module exposing add_parser(subparsers)
SUBCOMMANDS = {
    "compressors": "compact_hooks.catalog",
    "bench": "compact_hooks.bench",
    "run": "compact_hooks.integrations.diffusers.job",
    "launch": "compact_hooks.launcher.launch",
    "report": "compact_hooks.bench.report",
    "train-tiny": "compact_hooks.integrations.diffusers.train_tiny",
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``compact-hooks``; with ``command``, only that subcommand is loaded."""
    parser = argparse.ArgumentParser(
        prog="compact-hooks",
        description="Compressed residual collectives for parallel diffusion inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [command] if command in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in names:
        importlib.import_module(SUBCOMMANDS[name]).add_parser(sub)
    return parser


def run_one(command: str, add_parser: Callable[[argparse._SubParsersAction], object],
            argv: Optional[Sequence[str]] = None) -> int:
    """``python -m <module of a subcommand> ARGS``: run one subcommand as ``compact-hooks <command> ARGS``
    would (the command word itself is optional)."""
    parser = argparse.ArgumentParser(prog="compact-hooks")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != command:
        args_list = [command, *args_list]
    args = parser.parse_args(args_list)
    return int(args.handler(args) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(args_list[0] if args_list else None).parse_args(args_list)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
