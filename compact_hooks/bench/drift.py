"""``compact-hooks bench drift``: per-step error of one codec under each residual mode.

JSON shape (see docs/benchmarks.md)::

    {"compressor": .., "steps": .., "modes": {"none": [err per step], "delta": [..], "ef": [..], "ef2": [..]}}

With ``--warmup-compressor``, ``modes`` start with that codec's lossy first step, and the same run
adds ``warmup_compressor`` and ``full_warmup`` (the per-step errors with a full first step) to
compare side by side.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from compact_hooks.registry import build_compressor
from compact_hooks.residual import MODES

from .options import spec_arg
from .workload import walk_error


def bench_drift(spec: Any, steps: int, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
                warmup_spec: Any = None) -> dict[str, Any]:
    codec = build_compressor(spec)
    warmup = build_compressor(warmup_spec) if warmup_spec is not None else None
    modes = {mode: walk_error(codec, shape, dtype, steps, mode, device, warmup) for mode in MODES}
    result = {"compressor": codec.spec(), "steps": steps, "shape": list(shape), "modes": modes}
    if warmup is not None:
        result["warmup_compressor"] = warmup.spec()
        result["full_warmup"] = {mode: walk_error(codec, shape, dtype, steps, mode, device) for mode in MODES}
    return result


def _print_drift(result: dict[str, Any]) -> None:
    warm = result.get("warmup_compressor")
    print(f"compressor {result['compressor']}, relative error per step"
          + (f"; first step {warm} (full_* columns: a full first step)" if warm else ""))
    columns = {m: result["modes"][m] for m in result["modes"]}
    if warm:
        columns.update({f"full_{m}": v for m, v in result["full_warmup"].items() if m in ("ef", "ef2")})
    print("step " + " ".join(f"{m:>9}" for m in columns))
    for t in range(result["steps"]):
        print(f"{t:>4} " + " ".join(f"{v[t]:>9.4f}" for v in columns.values()))


def main_drift(args: argparse.Namespace) -> int:
    warmup = spec_arg(args.warmup_compressor) if args.warmup_compressor else None
    result = bench_drift(spec_arg(args.compressor), args.steps, args.shape, args.dtype, args.device, warmup)
    print(json.dumps(result, indent=2)) if args.json else _print_drift(result)
    return 0
