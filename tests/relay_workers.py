"""Rank programs of tests/test_relay_ring.py: the relay ring (``hook.start_relay``) on real gloo groups."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.collectives import ring_exchange
from compact_hooks.hook import CollectiveCall, CommHook, WrappingHook

STEPS = 4


class PerHop(WrappingHook):
    """The per-hop path of any hook: ``start_relay`` is CommHook's (a ring exchange per hop)."""

    def start_relay(self, call: CollectiveCall) -> Any:
        return CommHook.start_relay(self, call)


def block(rank: int, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank ``rank``'s K block at ``step``: a slowly changing activation (small residuals)."""
    base = torch.randn(1, 24, 4, 16, generator=torch.Generator().manual_seed(10 + rank))
    drift = torch.randn(1, 24, 4, 16, generator=torch.Generator().manual_seed(1000 + 7 * rank + step))
    return (base + 0.05 * step * drift).to(dtype)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - ref).double()) / torch.linalg.vector_norm(ref.double()))


def relay_blocks(hook: CommHook, x: torch.Tensor, key: str = "blocks.0.attn:k") -> list[torch.Tensor]:
    """Hop 1 .. P-1 blocks of one relay."""
    return [work.wait().clone() for work in hook.start_relay(CollectiveCall("ring_exchange", x, None, key=key))]


def exact_worker(rank: int, world: int) -> dict[str, Any]:
    """Relay of PassthroughHook, CastHook(float32) and a lossless CompactHook vs a plain exchange per
    hop and vs the source blocks themselves, over steps."""
    out: dict[str, Any] = {}
    hooks: dict[str, Callable[[], CommHook]] = {
        "passthrough": lambda: ch.PassthroughHook(60),
        "cast_fp32": lambda: ch.CastHook(torch.float32, 60),
        "compact_bf16_on_bf16": lambda: ch.CompactHook({"compressor": "bf16", "timeout_s": 60}),
        "compact_int2_full": lambda: ch.CompactHook({"compressor": "int2", "warmup_steps": 99, "warmup_compressor": None,
                                                     "timeout_s": 60}),
    }
    for name, make in hooks.items():
        hook = make()
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        problems = []
        for step in range(STEPS):
            x = block(rank, step, dtype)
            got = relay_blocks(hook, x)
            cur = x
            for hop, blk in enumerate(got, start=1):
                cur = ring_exchange(cur, None)
                src = (rank - hop) % world
                if not torch.equal(blk, cur) or not torch.equal(blk, block(src, step, dtype)):
                    problems.append(f"step {step} hop {hop}")
            hook.next_step()
        keys = sorted(hook.stats().get("per_key", {}))
        out[name] = {"problems": problems, "keys": keys}
    return out


def error_worker(rank: int, world: int, codec: str) -> dict[str, Any]:
    """int2 / auto with error feedback, relay vs per hop: every rank's decoded block of every source,
    the error of each hop against the source's exact block, and the per-hop stats' error samples."""
    cfg = {"compressor": codec, "residual": "ef", "warmup_compressor": None, "timeout_s": 60, "verify_every": 2,
           "stats": {"error_every": 1}}
    out: dict[str, Any] = {}
    for name, hook in (("relay", ch.CompactHook(cfg)), ("per_hop", PerHop(ch.CompactHook(cfg)))):
        blocks: dict[int, list[bytes]] = {}  # step -> bytes of the block of each source (None: own)
        errors: list[list[float]] = []
        for step in range(STEPS):
            got = relay_blocks(hook, block(rank, step))
            errors.append([rel_error(b, block((rank - h) % world, step)) for h, b in enumerate(got, start=1)])
            by_src = {(rank - h) % world: b for h, b in enumerate(got, start=1)}
            blocks[step] = [by_src[s].numpy().tobytes() if s in by_src else b"" for s in range(world)]
            hook.next_step()
        stats = hook.stats()
        out[name] = {"blocks": blocks, "errors": errors,
                     "sampled": {k: v.get("error_samples", 0) for k, v in stats.get("per_key", {}).items()},
                     "resyncs": stats.get("resyncs"), "keys": sorted(stats.get("per_key", {}))}
    return out


def encode_count_worker(rank: int, world: int) -> dict[str, Any]:
    """Codec encodes per step of one key: relay vs per hop (steps after the full first one)."""
    out = {}
    for name, wrap in (("relay", lambda h: h), ("per_hop", PerHop)):
        inner = ch.CompactHook({"compressor": "int2", "timeout_s": 60, "kernels": "torch"})
        hook = wrap(inner)
        codec = inner.session.compressor
        counts = []
        original = codec.encode

        def counted(*args: Any, **kwargs: Any) -> Any:
            counted.n += 1  # type: ignore[attr-defined]
            return original(*args, **kwargs)
        counted.n = 0  # type: ignore[attr-defined]
        codec.encode = counted  # type: ignore[method-assign]
        for step in range(STEPS):
            before = counted.n  # type: ignore[attr-defined]
            relay_blocks(hook, block(rank, step))
            counts.append(counted.n - before)  # type: ignore[attr-defined]
            hook.next_step()
        out[name] = counts
    return out


def overlap_worker(rank: int, world: int, per_hop: bool, patience_s: float) -> dict[str, Any]:
    """Three ranks. After hop 1, rank 0 "computes": it waits (at most ``patience_s``) until rank 1 says
    its hop 2 arrived. Rank 1 waits its hop 2 at once; that hop carries rank 0's forward, so it arrives
    during rank 0's compute only if rank 0 posted it before returning hop 1's block (double
    buffering). (Gloo's P2P works report completion only once waited, so rank 1 waits, not polls.)"""
    store = dist.distributed_c10d._get_default_store()
    inner = ch.CompactHook({"compressor": "int2", "timeout_s": 60})
    hook: CommHook = PerHop(inner) if per_hop else inner
    for step in range(2):  # the full send and its header check first
        relay_blocks(hook, block(rank, step))
        hook.next_step()
    dist.barrier()
    relay = hook.start_relay(CollectiveCall("ring_exchange", block(rank, 2), None, key="blocks.0.attn:k"))
    hop1, hop2 = relay.next(), relay.next()
    hop1.wait()
    rec: dict[str, Any] = {}
    if rank == 0:
        try:  # the caller's compute on hop 1's block
            store.wait(["seen"], timedelta(seconds=patience_s))
            rec["hop2_arrived_during_compute"] = True
        except (RuntimeError, dist.DistError):
            rec["hop2_arrived_during_compute"] = False
    got = hop2.wait()
    if rank == 1:
        store.set("seen", "1")
    rec["hop2"] = rel_error(got, block((rank - 2) % world, 2))
    hook.next_step()
    return rec


def diffusers_ring_worker(rank: int, world: int) -> dict[str, Any]:
    """Ring attention of a tiny model: relay (PassthroughHook, CompactHook) vs the per-hop path."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS, tiny_inputs

    model = TINY_MODELS["flux"]()
    inp = tiny_inputs("flux", model)
    with torch.no_grad():
        ref = model(**inp)[0]
    out: dict[str, Any] = {}
    for name, make in (("passthrough", lambda: ch.PassthroughHook(60)),
                       ("per_hop_passthrough", lambda: PerHop(ch.PassthroughHook(60))),
                       ("int2", lambda: ch.CompactHook({"compressor": "int2", "timeout_s": 60})),
                       ("int2_per_hop", lambda: PerHop(ch.CompactHook({"compressor": "int2", "timeout_s": 60})))):
        hook = make()
        handle = parallelize(model, None, mode="ring", hook=hook)
        with torch.no_grad():
            ys = [model(**inp)[0] for _ in range(3)]
        handle.remove()
        out[name] = {"err": [rel_error(y, ref) for y in ys], "keys": sorted(hook.stats().get("per_key", {}))}
    return out
