"""``compact-hooks bench codecs``: wire ratio, error and speed of each codec against the memory floor.

JSON shape (see docs/benchmarks.md)::

    {"memcpy_gbps": .., "shape": [..], "dtype": .., "codecs": [{"name", "params", "ratio",
     "rel_error", "encode_ms", "decode_ms", "floor_ms", "x_floor", "step"}]}

``step`` (codecs with fused kernels, else null): one compressed ``ef`` channel step, sender encode +
receiver decode with their base updates, on the torch path and on the fused Triton kernels (null
where they cannot run: CPU without the interpreter), against a device copy of the bytes the step
must touch: ``{"bytes", "floor_ms", "torch_ms", "fused_ms", "torch_gbps", "fused_gbps",
"fused_x_floor", "speedup"}``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from compact_hooks.kernels import supports, use_fused
from compact_hooks.registry import build_compressor
from compact_hooks.residual import Channel

from .options import spec_arg
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


def step_bytes(codec: Any, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes an ``ef`` step must touch: the sender reads x and its base and writes the payload and
    the new base; the receiver reads the payload and its base and writes the new base."""
    numel = int(torch.Size(shape).numel())
    itemsize = torch.empty((), dtype=dtype).element_size()
    return numel * (itemsize + 4 * itemsize) + 2 * codec.payload_nbytes(shape, torch.float32)


def bench_step(codec: Any, walk: list[torch.Tensor], gbps: float, dev: torch.device, repeats: int) -> dict[str, Any]:
    """Torch vs fused time of one compressed ``ef`` channel step (sender encode + receiver decode)."""
    shape, dtype = tuple(walk[0].shape), walk[0].dtype
    nbytes = step_bytes(codec, shape, dtype)
    times: dict[str, Any] = {}
    for path in ("torch", "triton"):
        if path == "triton" and not use_fused("auto", codec, dev, shape):
            times[path] = None
            continue
        send, recv = Channel(codec, "ef", None, kernels=path), Channel(codec, "ef", None, kernels=path)
        recv.decode(send.encode(walk[0], True)[0], shape, dtype, True)
        times[path] = time_ms(lambda: recv.decode(send.encode(walk[1], False)[0], shape, dtype, False), dev, repeats)
    floor_ms = nbytes / (gbps * 1e9) * 1e3
    gbps_of = lambda ms: None if ms is None else nbytes / (ms * 1e-3) / 1e9
    fused = times["triton"]
    return {"bytes": nbytes, "floor_ms": floor_ms, "torch_ms": times["torch"], "fused_ms": fused,
            "torch_gbps": gbps_of(times["torch"]), "fused_gbps": gbps_of(fused),
            "fused_x_floor": None if fused is None else fused / floor_ms,
            "speedup": None if fused is None else times["torch"] / fused}


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
            "step": bench_step(codec, walk, gbps, dev, repeats) if supports(codec, shape) else None,
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
    steps = [r for r in result["codecs"] if r.get("step")]
    if steps:
        print("ef channel step (encode + decode + base updates), torch vs fused Triton kernels:")
        print(f"{'codec':<10} {'floor ms':>9} {'torch ms':>9} {'fused ms':>9} {'torch GB/s':>11} "
              f"{'fused GB/s':>11} {'x floor':>8} {'speedup':>8}")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        for r in steps:
            s = r["step"]
            print(f"{r['name']:<10} {s['floor_ms']:>9.3f} {s['torch_ms']:>9.2f} {fmt(s['fused_ms'], '.3f'):>9} "
                  f"{s['torch_gbps']:>11.1f} {fmt(s['fused_gbps'], '.1f'):>11} {fmt(s['fused_x_floor'], '.1f'):>8} "
                  f"{fmt(s['speedup'], '.1f'):>8}")


def main_codecs(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [spec_arg(s) for s in args.compressor] if args.compressor else DEFAULT_CODECS
    result = bench_codecs(args.shape, args.dtype, specs, args.repeats, device=args.device)
    print(json.dumps(result, indent=2)) if args.json else _print_codecs(result)
    return 0
