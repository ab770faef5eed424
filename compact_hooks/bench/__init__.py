"""The benchmarks behind ``compact-hooks bench``: one module per kind.

* ``codecs``: wire ratio, error and speed of each codec against a memory copy;
* ``drift``: per-step error of one codec under each residual mode;
* ``scaling``: measured wire bytes and session memory against the formulas of DESIGN.md;
* ``e2e`` (+ ``e2e_worker``, its rank program): parallel inference across emulated hosts per link rate;
* ``quality``: image quality of every method on the trained digits model; ``trace`` (+ ``trace_io``):
  replay of recorded activation traces through the codecs;
* ``report``: the plot of a ``stats.json`` written by ``compact-hooks run`` (``compact-hooks report``);
* ``cli_startup``: start-up time of the ``compact-hooks`` command (``bench cli``);
* ``workload``: the synthetic activation stream; ``options``: the options of the kinds that import torch.

Nothing heavy is imported here: the kinds' options are declared in ``options`` (or in the kind's
module when it imports no torch, as ``e2e``) and each kind's module is imported when it runs.
"""

from __future__ import annotations

import argparse

from compact_hooks.cli import resolve

# `compact-hooks bench KIND` -> the light "module:function" (or "module": its add_parser) that declares KIND
KINDS = {
    "codecs": "compact_hooks.bench.options:add_codecs",
    "drift": "compact_hooks.bench.options:add_drift",
    "scaling": "compact_hooks.bench.options:add_scaling",
    "e2e": "compact_hooks.bench.e2e",
    "quality": "compact_hooks.bench.options:add_quality",
    "trace": "compact_hooks.bench.options:add_trace",
    "cli": "compact_hooks.bench.cli_startup",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its kinds on the ``compact-hooks`` command's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: codecs, drift, scaling, e2e, quality, trace, cli")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for target in KINDS.values():
        resolve(target)(kinds)
