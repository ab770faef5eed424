"""``compact-hooks bench drift``: per-step error of one codec under each residual mode.

JSON shape (see docs/benchmarks.md)::

    {"compressor": .., "steps": .., "modes": {"none": [err per step], "delta": [..], "ef": [..], "ef2": [..]}}
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from compact_hooks.registry import build_compressor
from compact_hooks.residual import MODES

from .options import dtype_arg, shape_arg, spec_arg
from .workload import walk_error


def bench_drift(spec: Any, steps: int, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    codec = build_compressor(spec)
    modes = {mode: walk_error(codec, shape, dtype, steps, mode, device) for mode in MODES}
    return {"compressor": codec.spec(), "steps": steps, "shape": list(shape), "modes": modes}


def _print_drift(result: dict[str, Any]) -> None:
    print(f"compressor {result['compressor']}, relative error per step")
    modes = list(result["modes"])
    print("step " + " ".join(f"{m:>9}" for m in modes))
    for t in range(result["steps"]):
        print(f"{t:>4} " + " ".join(f"{result['modes'][m][t]:>9.4f}" for m in modes))


def main_drift(args: argparse.Namespace) -> int:
    result = bench_drift(spec_arg(args.compressor), args.steps, args.shape, args.dtype, args.device)
    print(json.dumps(result, indent=2)) if args.json else _print_drift(result)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench drift`` on ``compact-hooks bench``'s subparsers."""
    drift = kinds.add_parser("drift", help="per-step error of residual modes none, delta, ef, ef2")
    drift.add_argument("--steps", type=int, default=50)
    drift.add_argument("--compressor", default="int2", help="a name or JSON spec")
    drift.add_argument("--shape", type=shape_arg, default=(256, 512))
    drift.add_argument("--dtype", type=dtype_arg, default=torch.float16)
    drift.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    drift.add_argument("--json", action="store_true")
    drift.set_defaults(handler=main_drift)
