"""``compact-hooks bench drift``: per-step error of one codec under each residual mode.

JSON shape (see docs/benchmarks.md)::

    {"compressor": .., "steps": .., "modes": {"none": [err per step], "delta": [..], "ef": [..], "ef2": [..]}}

With ``--warmup-compressor``, ``modes`` start with that codec's lossy first step, and the same run
adds ``warmup_compressor`` and ``full_warmup`` (the per-step errors with a full first step) to
compare side by side. With ``--base-dtype`` (``int8``, ``fp8``, ``bfloat16``, ...) every stream stores
its base that way, and ``input_base`` holds the per-step errors with bases in the input's dtype.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import torch

from compact_hooks.compressors.base import Compressor
from compact_hooks.registry import build_compressor
from compact_hooks.residual import BASE_DTYPES, MODES, Channel

from .options import spec_arg
from .workload import activation_walk, rel_error, walk_error


def walk_error_base(codec: Compressor, shape: tuple[int, ...], dtype: torch.dtype, steps: int, mode: str,
                    device: str, warmup: Optional[Compressor], base_dtype: str) -> list[float]:
    """:func:`~.workload.walk_error` with bases stored as ``base_dtype`` (``"input"``, a float dtype,
    ``"int8"`` or ``"fp8"``)."""
    if base_dtype == "input":
        return walk_error(codec, shape, dtype, steps, mode, device, warmup)
    channel = Channel(codec, mode, BASE_DTYPES.get(base_dtype, base_dtype), warmup)
    errors = []
    for t, x in enumerate(activation_walk(shape, steps, dtype, device=device)):
        _, recon = channel.encode(x, full=(t == 0 and mode != "none"))
        errors.append(rel_error(recon, x))
    return errors


def bench_drift(spec: Any, steps: int, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
                warmup_spec: Any = None, base_dtype: str = "input") -> dict[str, Any]:
    codec = build_compressor(spec)
    warmup = build_compressor(warmup_spec) if warmup_spec is not None else None
    modes = {mode: walk_error_base(codec, shape, dtype, steps, mode, device, warmup, base_dtype) for mode in MODES}
    result = {"compressor": codec.spec(), "steps": steps, "shape": list(shape), "modes": modes}
    if base_dtype != "input":
        result["base_dtype"] = base_dtype
        result["input_base"] = {mode: walk_error(codec, shape, dtype, steps, mode, device, warmup) for mode in MODES}
    if warmup is not None:
        result["warmup_compressor"] = warmup.spec()
        result["full_warmup"] = {mode: walk_error_base(codec, shape, dtype, steps, mode, device, None, base_dtype)
                                 for mode in MODES}
    return result


def _print_drift(result: dict[str, Any]) -> None:
    warm = result.get("warmup_compressor")
    base = result.get("base_dtype")
    print(f"compressor {result['compressor']}, relative error per step"
          + (f"; first step {warm} (full_* columns: a full first step)" if warm else "")
          + (f"; bases {base} (in_* columns: bases in the input dtype)" if base else ""))
    columns = {m: result["modes"][m] for m in result["modes"]}
    if warm:
        columns.update({f"full_{m}": v for m, v in result["full_warmup"].items() if m in ("ef", "ef2")})
    if base:
        columns.update({f"in_{m}": v for m, v in result["input_base"].items() if m in ("ef", "ef2")})
    print("step " + " ".join(f"{m:>9}" for m in columns))
    for t in range(result["steps"]):
        print(f"{t:>4} " + " ".join(f"{v[t]:>9.4f}" for v in columns.values()))


def main_drift(args: argparse.Namespace) -> int:
    warmup = spec_arg(args.warmup_compressor) if args.warmup_compressor else None
    result = bench_drift(spec_arg(args.compressor), args.steps, args.shape, args.dtype, args.device, warmup,
                         args.base_dtype)
    print(json.dumps(result, indent=2)) if args.json else _print_drift(result)
    return 0
