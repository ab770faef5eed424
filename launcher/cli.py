"""The ``compact-hooks`` command: compressors, bench, run, launch, report."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
