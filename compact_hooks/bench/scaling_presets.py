"""Real video and image workloads for ``bench scaling --preset``, and the formulas of their bases and bytes.

Per transformer block a sequence-parallel mode makes these compressed calls (keys in call order;
``s = ceil(S/P)`` tokens per rank, ``H`` hidden = heads x head_dim, ``P`` ranks)::

    ulysses    qkv (Q, K, V in one all_to_all of [P, 3, 1, s, H/P]), o: 2(P-1) streams of 3*s*H/P
               and s*H/P values
    allgather  k, v: all_gather of [1, s, heads, D]        P streams of s*H (one per source, own included)
    ring       k, v: relays of [1, s, heads, D] (each block encoded once, forwarded P-1 hops):
               P streams of s*H, P-1 payloads sent per step
    usp        Ulysses in groups of U ranks (q, k, v, then o; 2(U-1) streams of s*H/U) and relays over
               R = P/U groups of K/V blocks [1, U*s, heads/U, D] in between (R streams of s*H)

The call structure is the integration's (integrations/diffusers/attention.py, usp.py): a change there
shows up as a difference in the small-scale check (tests/test_bases.py).

A base option stores each stream's base as bf16 (2 B per value), int8/fp8 (1 B per value padded to
groups of 64, plus a 4-byte scale per group: :func:`compact_hooks.bases.quant_nbytes`), and offloaded
(``base_device`` "cpu": the same bytes in host memory; the GPU holds the window of the current key and
the next, at most the two largest consecutive keys, three with relays, whose K and V are in flight
together). Wire bytes are the codec's exact payload lengths; a step's wire bytes do not depend on the
base option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from compact_hooks.bases import PREFETCH_AHEAD, quant_nbytes

MODES = ("ulysses", "allgather", "ring", "usp")
# name -> (base_dtype, base_device)
BASE_OPTIONS: dict[str, tuple[str, str]] = {
    "bf16": ("bfloat16", "input"), "int8": ("int8", "input"), "fp8": ("fp8", "input"),
    "bf16 offloaded": ("bfloat16", "cpu"), "int8 offloaded": ("int8", "cpu"),
}
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
USP_MAX_ULYSSES = 8  # Ulysses inside a host of 8 GPUs, ring across hosts


@dataclass(frozen=True)
class Preset:
    """A workload: tokens in joint attention, hidden size, heads, attention blocks, sampler steps."""

    name: str
    tokens: int
    heads: int
    head_dim: int
    blocks: int
    steps: int
    note: str

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("flux-dev-1024", 4096 + 512, 24, 128, 57, 28,
           "FLUX.1-dev 1024x1024: 64x64 latent patches + 512 T5 tokens, 19 double + 38 single blocks"),
    Preset("wan2.1-14b-720p-81f", 75_600, 40, 128, 40, 50,
           "Wan2.1-T2V-14B 1280x720, 81 frames: 21 latent frames x 45x80 patches (text by cross-attention)"),
    Preset("hunyuanvideo-720p-129f", 118_800 + 256, 24, 128, 60, 50,
           "HunyuanVideo 1280x720, 129 frames: 33 latent frames x 45x80 patches + 256 text tokens, "
           "20 double + 40 single blocks"),
    Preset("cogvideox-5b", 17_550 + 226, 48, 64, 42, 50,
           "CogVideoX-5B 720x480, 49 frames: 13 latent frames x 30x45 patches + 226 text tokens"),
)}


@dataclass(frozen=True)
class KeyPlan:
    """One compressed call of a block: its role, op, chunk shape, streams held and payloads sent."""

    role: str
    op: str
    chunk: tuple[int, ...]
    streams: int  # channels this rank holds (sender and receiver sides)
    payloads: int  # payloads this rank sends per call
    raw_values: int  # values the plain collective sends per call (plain_bytes / itemsize)

    @property
    def numel(self) -> int:
        return math.prod(self.chunk)


def shard(tokens: int, world: int) -> int:
    """Tokens per rank; a sequence the group does not divide is padded."""
    return -(-tokens // world)


def usp_degrees(world: int, heads: int) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)``: the largest Ulysses group of at most 8 ranks dividing both."""
    u = max(d for d in range(1, min(world, USP_MAX_ULYSSES) + 1) if world % d == 0 and heads % d == 0)
    return u, world // u


def feasible(mode: str, world: int, heads: int) -> Optional[str]:
    """Why ``mode`` cannot run on ``world`` ranks with ``heads`` heads, or ``None``."""
    if mode == "ulysses" and heads % world:
        return f"{heads} heads are not divisible by {world} ranks"
    return None


def block_plan(mode: str, tokens: int, heads: int, head_dim: int, world: int,
               ulysses_degree: Optional[int] = None) -> list[KeyPlan]:
    """The compressed calls of one attention block on one rank, in call order (``usp``: Ulysses in
    groups of ``ulysses_degree`` ranks, by default :func:`usp_degrees`)."""
    s, P, H = shard(tokens, world), world, heads * head_dim
    if mode == "ulysses":  # Q, K, V fused in one all-to-all (no rules telling them apart), then O
        return [KeyPlan("qkv", "all_to_all", (3, 1, s, H // P), 2 * (P - 1), P - 1, 3 * (P - 1) * s * H // P),
                KeyPlan("o", "all_to_all", (1, s, H // P), 2 * (P - 1), P - 1, (P - 1) * s * H // P)]
    if mode == "allgather":
        return [KeyPlan(r, "all_gather", (1, s, heads, head_dim), P, P - 1, (P - 1) * s * H) for r in "kv"]
    if mode == "ring":  # relays: each block encoded once, forwarded P - 1 hops, one stream per source
        return [KeyPlan(r, "ring_exchange", (1, s, heads, head_dim), P, P - 1, (P - 1) * s * H) for r in "kv"]
    if mode == "usp":
        U = ulysses_degree or usp_degrees(P, heads)[0]
        R = P // U
        a2a = [KeyPlan(r, "all_to_all", (1, s, H // U), 2 * (U - 1), U - 1, (U - 1) * s * H // U)
               for r in "qkvo"] if U > 1 else []
        ring = [KeyPlan(f"ring_{r}", "ring_exchange", (1, U * s, heads // U, head_dim), R, R - 1, (R - 1) * U * s * H // U)
                for r in "kv"] if R > 1 else []
        return a2a[:3] + ring + a2a[3:]
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


def stream_bytes(numel: int, base_dtype: str) -> int:
    """Bytes of one stream's base of ``numel`` values stored as ``base_dtype``."""
    return quant_nbytes(numel) if base_dtype in ("int8", "fp8") else numel * FLOAT_BYTES[base_dtype]


def memory(plan: list[KeyPlan], blocks: int, base_dtype: str, base_device: str) -> dict[str, int]:
    """Base bytes per rank: ``device`` (all bases, or the offload window's peak) and ``host``."""
    per_key = [k.streams * stream_bytes(k.numel, base_dtype) for k in plan]
    total = blocks * sum(per_key)
    if base_device != "cpu":
        return {"device": total, "host": 0}
    # the current key, the prefetched next one(s), and for relays (K and V in flight together) one more
    span = PREFETCH_AHEAD + 1 + any(k.op == "ring_exchange" for k in plan)
    cycle = per_key * min(blocks, span)  # consecutive keys, across a block boundary too
    window = max(sum(cycle[(i + j) % len(cycle)] for j in range(span)) for i in range(len(cycle)))
    return {"device": min(window, total), "host": total}


def wire(plan: list[KeyPlan], blocks: int, compressor: Any, warmup: Any, steps: int, itemsize: int) -> dict[str, int]:
    """Bytes one rank sends: ``raw`` and ``wire`` per steady step, ``first_step`` (full sends, with the
    ``warmup`` codec when given), per image (``steps`` steps) raw and compressed."""
    import torch

    from compact_hooks.registry import build_compressor
    from compact_hooks.wire import raw_nbytes

    codec = build_compressor(compressor)
    first_codec = build_compressor(warmup) if warmup is not None else None
    dtype = {2: torch.bfloat16, 4: torch.float32}[itemsize]
    raw = blocks * sum(k.raw_values for k in plan) * itemsize
    steady = blocks * sum(k.payloads * codec.payload_nbytes(k.chunk, torch.float32) for k in plan)
    first = blocks * sum(k.payloads * (first_codec.payload_nbytes(k.chunk, dtype) if first_codec is not None
                                       else raw_nbytes(k.numel, dtype)) for k in plan)
    return {"raw_bytes_per_step": raw, "wire_bytes_per_step": steady, "wire_bytes_first_step": first,
            "raw_bytes_per_image": raw * steps, "wire_bytes_per_image": first + steady * (steps - 1)}
