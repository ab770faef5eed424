"""``compact-hooks bench trace DIR``: replay recorded activations through every codec, offline.

A trace (``compact-hooks run --record-trace DIR``, see :mod:`.trace_io`) holds each step's tensor of
chosen call sites as the hook saw it. Here every stream of it goes through a sender and a receiver
:class:`~compact_hooks.residual.Channel` per codec and residual mode, as the compact hook would send
it: an ``all_to_all`` tensor is cut into ``world_size`` chunks along dim 0 and the chunks for the other
ranks are streams; any other op's tensor is one stream. The first ``warmup`` steps of a request are
full sends, coded by the warm-up codec the recorded run used (its config in the manifest; ``int8``, the
config default, when the manifest has none; ``--warmup-compressor none``: exact); a codec whose payload
is not smaller than the tensor sends it plain (as the hook does).

Reported per key and overall: raw and wire bytes, ratio, and the receiver's relative L2 error per
step (mean, final and max over the compressed steps; full sends are not counted) with error feedback
(``ef``) and without (``delta``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..config import CompactConfig
from ..registry import available_compressors, build_compressor
from ..residual import Channel
from .options import TRACE_MODES, spec_arg
from .trace_io import load_manifest, read_streams

MODES = TRACE_MODES  # declared with the parser (options.py)


def default_codecs() -> list[Any]:
    """Every registered codec except the identity."""
    return [name for name in available_compressors() if name != "none"]


def codec_label(codec: Any) -> str:
    """``int2`` or ``lowrank(factor_bits=8,rank=4)`` for a name or spec."""
    if isinstance(codec, str):
        return codec
    params = ",".join(f"{k}={v}" for k, v in sorted(codec.items()) if k != "name")
    return f"{codec.get('name')}({params})" if params else str(codec.get("name"))


def _rel(y: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y.float() - x.float()) / torch.linalg.vector_norm(x.float()).clamp_min(1e-30))


def recorded_warmup(manifest: dict[str, Any]) -> Any:
    """The warm-up codec spec of the recorded run (its config in the manifest), else the config default."""
    config = manifest.get("config")
    if isinstance(config, dict) and "warmup_compressor" in config:
        return config["warmup_compressor"]
    return CompactConfig.model_fields["warmup_compressor"].default


def replay_stream(codec: Any, mode: str, tensors: Sequence[tuple[int, torch.Tensor]], warmup: int = 1,
                  warmup_compressor: Any = None) -> dict[str, Any]:
    """One stream through a sender and a receiver Channel: ``{raw_bytes, wire_bytes, errors}``, the
    receiver's relative error per step (``None`` for full sends). Full sends are coded by
    ``warmup_compressor`` (``None``: exact, the tensor's own bytes), as the hook codes them."""
    compressor = build_compressor(codec)
    warm = build_compressor(warmup_compressor) if warmup_compressor is not None else None
    sender, receiver = Channel(compressor, mode, None, warm), Channel(compressor, mode, None, warm)
    raw = wire = 0
    errors: list[Optional[float]] = []
    shape: Optional[tuple[int, ...]] = None
    for step, x in tensors:
        nbytes = x.numel() * x.element_size()
        raw += nbytes
        if not x.is_floating_point() or compressor.payload_nbytes(tuple(x.shape), x.dtype) >= nbytes:
            wire += nbytes  # the hook sends such a tensor plain
            errors.append(0.0)
            continue
        full = step < warmup or tuple(x.shape) != shape  # a new request or shape: full send, as the hook does
        shape = tuple(x.shape)
        payload, _ = sender.encode(x, full)
        y = receiver.decode(payload, tuple(x.shape), x.dtype, full)
        wire += payload.numel()
        errors.append(None if full else _rel(y, x))
    return {"raw_bytes": raw, "wire_bytes": wire, "errors": errors}


def _streams(op: str, rank: int, world: int, tensors: list[tuple[int, torch.Tensor]]) -> list[list[tuple[int, torch.Tensor]]]:
    if op != "all_to_all" or world < 2:
        return [tensors]
    return [[(s, t.chunk(world, dim=0)[j]) for s, t in tensors] for j in range(world) if j != rank]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _summary(errors_by_step: list[list[Optional[float]]]) -> dict[str, Any]:
    """Mean, final and max over the compressed steps of the per-step mean over streams."""
    per_step = [m for m in (_mean(e) for e in errors_by_step) if m is not None]
    if not per_step:
        return {"mean": None, "final": None, "max": None, "per_step": []}
    return {"mean": sum(per_step) / len(per_step), "final": per_step[-1], "max": max(per_step), "per_step": per_step}


def replay(trace: str, codecs: Optional[Sequence[Any]] = None, modes: Sequence[str] = MODES,
           keys: Sequence[str] = ("*",), warmup: int = 1, warmup_compressor: Any = "recorded") -> dict[str, Any]:
    """Replay a trace directory; see the module docstring for what is reported. ``warmup_compressor``:
    a codec spec for the full sends, ``None`` for exact ones, ``"recorded"``: the recorded run's."""
    manifest = load_manifest(trace)
    if warmup_compressor == "recorded":
        warmup_compressor = recorded_warmup(manifest)
    if warmup_compressor is not None:
        build_compressor(warmup_compressor)  # an unknown name fails here, listing the registered ones
    world = int(manifest.get("world_size", 1))
    ops = {k: v.get("op", "all_gather") for k, v in manifest["keys"].items()}
    streams: dict[str, list[list[tuple[int, torch.Tensor]]]] = {}
    for rank, key, tensors in read_streams(trace, keys):
        streams.setdefault(key, []).extend(_streams(ops.get(key, "all_gather"), rank, world, tensors))
    if not streams:
        raise ValueError(f"{trace}: no recorded key matches {list(keys)}; recorded: {sorted(manifest['keys'])[:8]}")
    results = []
    for codec in codecs or default_codecs():
        build_compressor(codec)  # an unknown name fails here, listing the registered ones
        for mode in modes:
            per_key, total_raw, total_wire = {}, 0, 0
            overall: list[list[Optional[float]]] = []
            for key, key_streams in streams.items():
                runs = [replay_stream(codec, mode, s, warmup, warmup_compressor) for s in key_streams]
                raw = sum(r["raw_bytes"] for r in runs)
                wire = sum(r["wire_bytes"] for r in runs)
                n = max(len(r["errors"]) for r in runs)
                by_step = [[r["errors"][i] for r in runs if i < len(r["errors"])] for i in range(n)]
                per_key[key] = {"raw_bytes": raw, "wire_bytes": wire, "ratio": raw / wire if wire else None,
                                "streams": len(runs), "error": _summary(by_step)}
                total_raw, total_wire = total_raw + raw, total_wire + wire
                overall.extend([] for _ in range(len(by_step) - len(overall)))
                for i, errs in enumerate(by_step):
                    overall[i].append(_mean(errs))
            results.append({"codec": codec_label(codec), "spec": codec,
                            "mode": mode, "raw_bytes": total_raw, "wire_bytes": total_wire,
                            "ratio": total_raw / total_wire if total_wire else None, "error": _summary(overall),
                            "per_key": per_key})
    return {"trace": str(trace), "model": manifest.get("model"), "world_size": world,
            "steps": manifest.get("steps"), "keys": sorted(streams), "warmup_steps": warmup,
            "warmup_compressor": warmup_compressor, "results": results}


def print_table(result: dict[str, Any]) -> None:
    print(f"trace {result['trace']}: model {result['model']}, {result['world_size']} ranks, "
          f"{result['steps']} steps, {len(result['keys'])} keys")
    warm = result.get("warmup_compressor")
    print(f"full sends (first {result['warmup_steps']} step(s)): {'exact' if warm is None else codec_label(warm)}")
    print(f"{'codec':<32} {'mode':<6} {'ratio':>7} {'err mean':>9} {'err final':>9} {'err max':>9}")
    for r in result["results"]:
        e = r["error"]

        def f(v: Optional[float]) -> str:
            return "-" if v is None or math.isnan(v) else f"{v:.2e}"

        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['codec']:<32} {r['mode']:<6} {ratio:>7} {f(e['mean']):>9} {f(e['final']):>9} {f(e['max']):>9}")


def main_trace(args: argparse.Namespace) -> int:
    codecs = [spec_arg(c) for c in args.codecs] if args.codecs else None
    warm = getattr(args, "warmup_compressor", "recorded")
    warm = None if warm in ("none", "null") else warm if warm == "recorded" else spec_arg(warm)
    result = replay(args.trace, codecs, args.modes.split(","), args.keys.split(","), args.warmup, warm)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_table(result)
    return 0
