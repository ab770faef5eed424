"""The benchmarks behind ``compact-hooks bench``: one module per kind.

* ``codecs``: wire ratio, error and speed of each codec against a memory copy;
* ``drift``: per-step error of one codec under each residual mode;
* ``scaling``: measured wire bytes and session memory against the formulas of DESIGN.md;
* ``e2e`` (+ ``e2e_worker``, its rank program): parallel inference across emulated hosts per link rate;
* ``quality``: image quality of every method on the trained digits model; ``trace`` (+ ``trace_io``):
  replay of recorded activation traces through the codecs;
* ``report``: the plot of a ``stats.json`` written by ``compact-hooks run`` (``compact-hooks report``);
* ``workload`` and ``options``: the synthetic activation stream and the argument types they share.

Nothing is imported here: each subcommand loads only its own module.
"""

from __future__ import annotations

import argparse
import importlib

# `compact-hooks bench KIND`: the module under compact_hooks.bench whose add_parser(kinds) registers KIND
KINDS = ("codecs", "drift", "scaling", "e2e", "quality", "trace")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its kinds on the ``compact-hooks`` command's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: codecs, drift, scaling, e2e, quality, trace")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for kind in KINDS:
        importlib.import_module(f"{__name__}.{kind}").add_parser(kinds)
