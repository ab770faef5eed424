"""``compact-hooks bench``: codec speed against the memory floor, and error drift per residual mode.

JSON shapes (see docs/benchmarks.md)::

    codecs: {"memcpy_gbps": .., "shape": [..], "dtype": .., "codecs": [{"name", "params", "ratio",
             "rel_error", "encode_ms", "decode_ms", "floor_ms", "x_floor"}]}
    drift:  {"compressor": .., "steps": .., "modes": {"none": [err per step], "delta": [..], "ef": [..], "ef2": [..]}}
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Iterator, Optional

import torch

from compact_hooks.compressors.base import Compressor
from compact_hooks.registry import build_compressor
from compact_hooks.residual import MODES, Channel

# The codecs `bench codecs` measures by default, with the paper's settings where it has them.
DEFAULT_CODECS: list[Any] = [
    "none", "fp16", "int8", "int4", "int2", "int2cf", "int1",
    "nm", "topk", {"name": "lowrank", "rank": 32, "factor_bits": 4},
]


def activation_walk(shape: tuple[int, ...], steps: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                    drift: float = 0.05, device: str = "cpu") -> Iterator[torch.Tensor]:
    """A smooth random walk shaped like DiT activations: a low-rank token/channel structure with
    heavy-tailed per-channel scales, drifting by about ``drift`` of its norm per step."""
    g = torch.Generator().manual_seed(seed)
    tokens, channels = int(torch.Size(shape[:-1]).numel()), shape[-1]
    rank = min(16, tokens, channels)
    scale = torch.exp(0.8 * torch.randn(channels, generator=g))
    u, v = torch.randn(tokens, rank, generator=g), torch.randn(rank, channels, generator=g)
    x = (u @ v / rank**0.5 + 0.3 * torch.randn(tokens, channels, generator=g)) * scale
    du = torch.randn(tokens, rank, generator=g)
    for _ in range(steps):
        yield x.reshape(shape).to(device=device, dtype=dtype)
        du = 0.9 * du + 0.1 * torch.randn(tokens, rank, generator=g)
        step = (du @ v / rank**0.5 + 0.1 * torch.randn(tokens, channels, generator=g)) * scale
        x = x + drift * step * (x.norm() / step.norm())


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((approx - exact).float()) / torch.linalg.vector_norm(exact.float()).clamp_min(1e-30))


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


def walk_error(codec: Compressor, shape: tuple[int, ...], dtype: torch.dtype, steps: int, mode: str = "ef",
               device: str = "cpu") -> list[float]:
    """Per-step relative error of one stream (full send on step 0, then residuals) under ``mode``."""
    channel = Channel(codec, mode, None)
    errors = []
    for t, x in enumerate(activation_walk(shape, steps, dtype, device=device)):
        _, recon = channel.encode(x, full=(t == 0 and mode != "none"))
        errors.append(rel_error(recon, x))
    return errors


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


def bench_drift(spec: Any, steps: int, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    codec = build_compressor(spec)
    modes = {mode: walk_error(codec, shape, dtype, steps, mode, device) for mode in MODES}
    return {"compressor": codec.spec(), "steps": steps, "shape": list(shape), "modes": modes}


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes comma-separated integers like 1088,3072; got {text!r}")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--shape dims must be positive; got {text!r}")
    return dims


def _dtype(text: str) -> torch.dtype:
    if text not in ("float32", "float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"--dtype is float32, float16 or bfloat16; got {text!r}")
    return getattr(torch, text)


def _spec(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("{") else text


def _print_codecs(result: dict[str, Any]) -> None:
    print(f"shape {result['shape']} {result['dtype']} on {result['device']} ({result['threads']} threads); "
          f"memcpy {result['memcpy_gbps']:.1f} GB/s")
    print(f"{'codec':<10} {'ratio':>8} {'rel_err':>9} {'enc ms':>8} {'dec ms':>8} {'floor ms':>9} {'x floor':>8}")
    for r in result["codecs"]:
        print(f"{r['name']:<10} {r['ratio']:>8.2f} {r['rel_error']:>9.4f} {r['encode_ms']:>8.2f} "
              f"{r['decode_ms']:>8.2f} {r['floor_ms']:>9.3f} {r['x_floor']:>8.1f}")


def _print_drift(result: dict[str, Any]) -> None:
    print(f"compressor {result['compressor']}, relative error per step")
    modes = list(result["modes"])
    print("step " + " ".join(f"{m:>9}" for m in modes))
    for t in range(result["steps"]):
        print(f"{t:>4} " + " ".join(f"{result['modes'][m][t]:>9.4f}" for m in modes))


def main_codecs(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [_spec(s) for s in args.compressor] if args.compressor else DEFAULT_CODECS
    result = bench_codecs(args.shape, args.dtype, specs, args.repeats, device=args.device)
    print(json.dumps(result, indent=2)) if args.json else _print_codecs(result)
    return 0


def main_drift(args: argparse.Namespace) -> int:
    result = bench_drift(_spec(args.compressor), args.steps, args.shape, args.dtype, args.device)
    print(json.dumps(result, indent=2)) if args.json else _print_drift(result)
    return 0


def add_parser(sub: argparse._SubParsersAction, extra: Optional[Callable[[argparse._SubParsersAction], None]] = None) -> None:
    bench = sub.add_parser("bench", help="benchmarks: codecs, drift, e2e")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)

    codecs = kinds.add_parser("codecs", help="wire ratio, error and speed of each codec vs a memory copy")
    codecs.add_argument("--shape", type=_shape, default=(1088, 3072))
    codecs.add_argument("--dtype", type=_dtype, default=torch.float16)
    codecs.add_argument("--compressor", action="append", help="a name or JSON spec (repeatable); default: all")
    codecs.add_argument("--repeats", type=int, default=10)
    codecs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    codecs.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    codecs.add_argument("--json", action="store_true")
    codecs.set_defaults(handler=main_codecs)

    drift = kinds.add_parser("drift", help="per-step error of residual modes none, delta, ef, ef2")
    drift.add_argument("--steps", type=int, default=50)
    drift.add_argument("--compressor", default="int2", help="a name or JSON spec")
    drift.add_argument("--shape", type=_shape, default=(256, 512))
    drift.add_argument("--dtype", type=_dtype, default=torch.float16)
    drift.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    drift.add_argument("--json", action="store_true")
    drift.set_defaults(handler=main_drift)

    from compact_hooks.launcher import bench_scaling

    bench_scaling.add_parser(kinds)
    from compact_hooks.launcher import bench_e2e

    bench_e2e.add_parser(kinds)
