"""The example configs that ship inside the package, and ``compact-hooks configs``.

Each ``*.json`` next to this file is a ready-made config. You can name it anywhere a config path is
accepted (``--config``, :func:`compact_hooks.load_config`, ``init_inference``) by its short name:
the file stem without ``diffusers_``, with ``-`` for ``_`` (``diffusers_ulysses_int2.json`` is
``ulysses-int2``, ``deepspeed_tp_int8.json`` is ``deepspeed-tp-int8``). Its file name works too, and so
do the old names of ``examples/configs/`` (``ulysses_int2.json``, ``tp_int8.json``). A file that exists
at the given path always wins over a packaged config of the same name.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

HERE = Path(__file__).resolve().parent
# file -> (what runs it, one line on what it does); tests/test_wheel.py checks it lists every *.json here
DESCRIPTIONS = {
    "diffusers_ulysses_int2.json": (
        "compact-hooks run",
        "sequence-parallel diffusers inference: all-to-alls, all-gathers and ring exchanges as 2-bit residuals (ef)"),
    "deepspeed_ulysses_int2.json": (
        "deepspeed",
        "DeepSpeed Ulysses (sequence_parallel_size 2): the all-to-alls as 2-bit residuals (ef)"),
    "deepspeed_tp_int8.json": (
        "deepspeed",
        "DeepSpeed AutoTP inference (tp_size 2): the all-reduces as int8 residuals (ef)"),
}
# the names these files had in examples/configs/ before they moved into the package
OLD_NAMES = {"ulysses_int2.json": "deepspeed_ulysses_int2.json", "tp_int8.json": "deepspeed_tp_int8.json"}


class PackagedConfig(NamedTuple):
    """One shipped config: its short name, file, what runs it and a one-line description."""

    name: str
    path: Path
    runs_with: str
    description: str


def short_name(file_name: str) -> str:
    """``diffusers_ulysses_int2.json`` -> ``ulysses-int2``; ``deepspeed_tp_int8.json`` -> ``deepspeed-tp-int8``."""
    stem = Path(file_name).stem
    if stem.startswith("diffusers_"):
        stem = stem[len("diffusers_"):]
    return stem.replace("_", "-")


def packaged_configs() -> list[PackagedConfig]:
    """Every shipped config, sorted by name."""
    rows = []
    for path in sorted(HERE.glob("*.json")):
        runs_with, description = DESCRIPTIONS.get(path.name, ("", ""))
        rows.append(PackagedConfig(short_name(path.name), path, runs_with, description))
    return sorted(rows, key=lambda row: row.name)


def find_packaged(name: str) -> Optional[PackagedConfig]:
    """The shipped config called ``name`` (short name, file name, file stem or old examples/ name), or None."""
    name = OLD_NAMES.get(name, name)
    for row in packaged_configs():
        if name in (row.name, row.path.name, row.path.stem):
            return row
    return None


def resolve_config_path(path: Union[str, os.PathLike[str]]) -> Path:
    """Where to read the config ``path`` from: the file itself when it exists, else the packaged config
    of that name when ``path`` is a bare name (no directory), else ``path`` unchanged (reading it then
    fails with the caller's message; :func:`missing_hint` says what was meant)."""
    p = Path(path)
    try:
        if p.is_file() or p.name != str(path):
            return p
    except ValueError:  # a NUL byte: the caller reports the unusable path
        return p
    row = find_packaged(str(path))
    return row.path if row is not None else p


def missing_hint(path: Union[str, os.PathLike[str]]) -> str:
    """Text to append to "cannot read the config file" for ``path``: the packaged config it may mean."""
    row = find_packaged(Path(path).name)
    if row is not None:
        return f"; the packaged copy of {Path(path).name} is named {row.name!r} (--config {row.name}, no path)"
    names = ", ".join(r.name for r in packaged_configs())
    return f"; packaged configs (name them without a path): {names} (`compact-hooks configs` lists them)"


def main(args: argparse.Namespace) -> int:
    """``compact-hooks configs``: list the shipped configs; with a NAME, print that one (or its path)."""
    if args.name is None:
        rows = packaged_configs()
        width = max(len(r.name) for r in rows)
        use = max(len(r.runs_with) for r in rows)
        for r in rows:
            print(f"{r.name:<{width}}  {r.runs_with:<{use}}  {r.description}")
        print("\nuse one as --config NAME; `compact-hooks configs NAME` prints it, --path gives its file")
        return 0
    row = find_packaged(args.name)
    if row is None:
        args.parser.error(f"no packaged config named {args.name!r}; known: "
                          + ", ".join(r.name for r in packaged_configs()))
    print(str(row.path) if args.path else row.path.read_text(encoding="utf-8"), end="\n" if args.path else "")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``compact-hooks configs`` on the command's subparsers."""
    p = sub.add_parser("configs", help="list the example configs shipped in the package, or print one",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a packaged config to print (e.g. ulysses-int2)")
    p.add_argument("--path", action="store_true", help="print the config's file path instead of its text")
    p.set_defaults(handler=main, parser=p)
