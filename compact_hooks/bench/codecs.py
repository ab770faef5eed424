"""``compact-hooks bench codecs``: wire ratio, error and speed of each codec against the memory floor.

JSON shape (see docs/benchmarks.md)::

    {"memcpy_gbps": .., "shape": [..], "dtype": .., "codecs": [{"name", "params", "ratio",
     "rel_error", "encode_ms", "decode_ms", "floor_ms", "x_floor"}]}
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from compact_hooks.registry import build_compressor

from .options import dtype_arg, shape_arg, spec_arg
from .workload import activation_walk, walk_error

# The codecs `bench codecs` measures by default, with the paper's settings where it has them.
DEFAULT_CODECS: list[Any] = [
    "none", "fp16", "int8", "int4", "int2", "int2cf", "int1",
    "nm", "topk", {"name": "lowrank", "rank": 32, "factor_bits": 4},
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def memcpy_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bandwidth of a plain tensor copy (bytes read + bytes written per second, GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_codecs(shape: tuple[int, ...], dtype: torch.dtype, specs: list[Any], repeats: int = 10,
                 steps: int = 8, device: str = "cpu") -> dict[str, Any]:
    dev = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(torch.Size(shape).numel())
    gbps = memcpy_gbps(numel * itemsize, dev, repeats)
    walk = list(activation_walk(shape, 2, dtype, device=device))
    residual = (walk[1].float() - walk[0].float()).to(dtype)
    rows = []
    for spec in specs:
        codec = build_compressor(spec)
        nbytes = codec.payload_nbytes(shape, dtype)
        payload = codec.encode(residual)
        encode_ms = time_ms(lambda: codec.encode(residual), dev, repeats)
        decode_ms = time_ms(lambda: codec.decode(payload, shape, dtype), dev, repeats)
        moved = 2 * (numel * itemsize + nbytes)  # encode reads x, writes payload; decode the reverse
        floor_ms = moved / (gbps * 1e9) * 1e3
        errors = walk_error(codec, shape, dtype, steps, "ef" if not codec.is_lossless(dtype) else "none", device)
        rows.append({
            "name": codec.name,
            "params": codec.params(),
            "ratio": numel * 2 / nbytes,  # versus fp16 on the wire, as the paper reports
            "rel_error": sum(errors[1:]) / max(1, len(errors) - 1),
            "encode_ms": encode_ms,
            "decode_ms": decode_ms,
            "floor_ms": floor_ms,
            "x_floor": (encode_ms + decode_ms) / floor_ms,
        })
    return {"memcpy_gbps": gbps, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "device": str(dev), "threads": torch.get_num_threads(), "codecs": rows}


def _print_codecs(result: dict[str, Any]) -> None:
    print(f"shape {result['shape']} {result['dtype']} on {result['device']} ({result['threads']} threads); "
          f"memcpy {result['memcpy_gbps']:.1f} GB/s")
    print(f"{'codec':<10} {'ratio':>8} {'rel_err':>9} {'enc ms':>8} {'dec ms':>8} {'floor ms':>9} {'x floor':>8}")
    for r in result["codecs"]:
        print(f"{r['name']:<10} {r['ratio']:>8.2f} {r['rel_error']:>9.4f} {r['encode_ms']:>8.2f} "
              f"{r['decode_ms']:>8.2f} {r['floor_ms']:>9.3f} {r['x_floor']:>8.1f}")


def main_codecs(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [spec_arg(s) for s in args.compressor] if args.compressor else DEFAULT_CODECS
    result = bench_codecs(args.shape, args.dtype, specs, args.repeats, device=args.device)
    print(json.dumps(result, indent=2)) if args.json else _print_codecs(result)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench codecs`` on ``compact-hooks bench``'s subparsers."""
    codecs = kinds.add_parser("codecs", help="wire ratio, error and speed of each codec vs a memory copy")
    codecs.add_argument("--shape", type=shape_arg, default=(1088, 3072))
    codecs.add_argument("--dtype", type=dtype_arg, default=torch.float16)
    codecs.add_argument("--compressor", action="append", help="a name or JSON spec (repeatable); default: all")
    codecs.add_argument("--repeats", type=int, default=10)
    codecs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    codecs.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    codecs.add_argument("--json", action="store_true")
    codecs.set_defaults(handler=main_codecs)
