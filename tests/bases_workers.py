"""Rank programs of tests/test_bases.py (8-bit and offloaded bases on real gloo ranks)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

import compact_hooks as ch
from compact_hooks.bases import nbytes
from compact_hooks.errors import ProtocolError

OPS = ("all_gather", "all_to_all", "all_reduce", "ring_exchange")


def drifting(rank: int, step: int, shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729)
    x0, direction = torch.randn(shape, generator=g) * (1 + rank), torch.randn(shape, generator=g)
    wobble = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 31 + step * 1009 + rank))
    return (x0 + 0.05 * step * direction + 0.01 * wobble) * scale


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def identity_worker(rank: int, world: int, cases: list[tuple[Any, str, str]], shape: tuple[int, ...], seed: int,
                    scale: float, steps: int) -> dict[Any, dict[str, Any]]:
    """Every (codec, residual, base_dtype) case through every op for ``steps`` steps: the base digests
    (equal on every rank that holds a stream) and the largest relative error of the last steps."""
    torch.set_num_threads(1)
    out = {}
    for i, (codec, residual, base_dtype) in enumerate(cases):
        hook = ch.CompactHook({"compressor": codec, "residual": residual, "base_dtype": base_dtype, "timeout_s": 60})
        plain = ch.PassthroughHook()
        errors = []
        for step in range(steps):
            x = drifting(rank, step, shape, seed, scale)
            for op in OPS:
                got = hook(ch.CollectiveCall(op, x, None, key=op))
                if step >= steps - 3:
                    want = plain(ch.CollectiveCall(op, x, None, key=op))
                    errors.append(float((got - want).norm() / want.norm()))
            hook.next_step()
        out[i] = {"digests": hook.session.base_digests(), "error": max(errors),
                  "memory": hook.session.memory_bytes()}
    return out


def offload_worker(rank: int, world: int, cases: list[tuple[Any, str]], shape: tuple[int, ...],
                   steps: int) -> dict[Any, dict[str, Any]]:
    """Each (codec, base_dtype) on the device and offloaded (``base_device`` "cpu"), with base
    verification every 3 exchanges: hashes of every output, the digests and the memory counters."""
    torch.set_num_threads(1)
    out = {}
    for i, (codec, base_dtype) in enumerate(cases):
        for device in ("input", "cpu"):
            hook = ch.CompactHook({"compressor": codec, "residual": "ef", "base_dtype": base_dtype,
                                   "base_device": device, "verify_every": 3, "timeout_s": 60})
            hashes = []
            for request in range(2):
                hook.begin_request()
                for step in range(steps):
                    x = drifting(rank, step, shape, request, 1.0)
                    for op in OPS:
                        hashes.append(_hash(hook(ch.CollectiveCall(op, x, None, key=op))))
                    hook.next_step()
            s = hook.session
            held = sum(nbytes(c.base) + nbytes(c.velocity) for st in s.keys.values() for c in st.channels.values())
            out[(i, device)] = {"hashes": hashes, "digests": s.base_digests(), "memory": s.memory_bytes(), "bases": held,
                                "host": s.host_memory_bytes(), "peak": s.window_peak_bytes(),
                                "resyncs": s.stats.resyncs, "stats_host": hook.stats()["host_memory_bytes"],
                                "stats_memory": hook.stats()["memory_bytes"]}
    return out


def disagree_worker(rank: int, world: int, key: str, values: list[Any]) -> str:
    """Rank ``r`` sets ``key`` to ``values[r]``: the settings handshake must raise ProtocolError."""
    hook = ch.CompactHook({"compressor": "int2", key: values[rank], "timeout_s": 30})
    try:
        hook(ch.CollectiveCall("all_gather", torch.ones(4, 8), None, key="x"))
    except ProtocolError as exc:
        return str(exc)
    return "no error"
