"""The ``compact-hooks`` command: compressors, bench, run, launch, report."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

# subcommand -> module under compact_hooks.launcher exposing add_parser(subparsers) and main(args)
SUBCOMMANDS = {
    "compressors": "compressors_cmd",
    "bench": "bench",
    "run": "run_job",
    "launch": "launch",
    "report": "report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compact-hooks",
        description="Compressed residual collectives for parallel diffusion inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"compact_hooks.launcher.{module_name}").add_parser(sub)
    return parser


def run_one(command: str, add_parser: Callable[[argparse._SubParsersAction], object],
            argv: Optional[Sequence[str]] = None) -> int:
    """``python -m compact_hooks.launcher.<module> ARGS``: run one subcommand as ``compact-hooks
    <command> ARGS`` would (the command word itself is optional)."""
    parser = argparse.ArgumentParser(prog="compact-hooks")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != command:
        args_list = [command, *args_list]
    args = parser.parse_args(args_list)
    return int(args.handler(args) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
