"""Rank programs of the LinkAwareHook / ``links: "inter_host"`` defect tests (issue 19, defects 4-6).

Hosts are emulated with :class:`compact_hooks.topology.Topology` names (``Topology("h0")``) or the
``COMPACT_HOOKS_HOSTNAME`` variable that ``build_hook``'s default Topology reads. Each function
returns plain data (what was raised, byte counts) for the test to assert on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.hook import WrappingHook
from compact_hooks.hooks.links import LinkAwareHook
from compact_hooks.topology import HOSTNAME_ENV, Topology


def _outcome(fn: Any) -> dict[str, Any]:
    """``{"error": class name, "msg": text}`` of what ``fn()`` raised (``"none"`` if nothing)."""
    try:
        fn()
    except ch.CompactHooksError as exc:
        return {"error": type(exc).__name__, "msg": str(exc)}
    return {"error": "none", "msg": ""}


def _x(rank: int, world: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2 * world, 256, generator=g) * (1.0 + 0.05 * step)


def disagree_on_links(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 has ``links: "inter_host"``, the others the default (``"all"``); then LinkAwareHooks whose
    ``compress`` differs. Every rank reports what its first collective raised."""
    out: dict[str, Any] = {}
    cfg = {"compressor": "int2", "timeout_s": 30}
    hook = ch.build_hook({**cfg, "links": "inter_host"} if rank == 0 else cfg)
    out["config"] = _outcome(lambda: hook(ch.CollectiveCall("all_to_all", _x(rank, world), None, key="q")))
    dist.barrier()
    compress = ("inter_host",) if rank == 0 else ("intra_host", "inter_host")
    direct = LinkAwareHook(ch.CompactHook(cfg), ch.PassthroughHook(30), Topology("h0"), compress=compress)
    out["compress"] = _outcome(lambda: direct(ch.CollectiveCall("all_gather", _x(rank, world), None, key="k")))
    return out


def _stall_or_call(rank: int, flag: str, first_call: Any) -> dict[str, Any]:
    """Rank 1 stalls (does not call) until rank 0 wrote ``flag`` (at most 60 s); rank 0 runs
    ``first_call`` and reports what it raised and how long it took."""
    if rank != 0:
        deadline = time.monotonic() + 60
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return {}
    start = time.monotonic()
    try:
        got = _outcome(first_call)
    finally:
        Path(flag).write_text("done")
    return {**got, "elapsed_s": time.monotonic() - start}


def stalled_peer_config(rank: int, world: int, flag: str, timeout_s: float) -> dict[str, Any]:
    """``build_hook`` with ``links: "inter_host"`` on two emulated hosts; rank 1 stalls."""
    os.environ[HOSTNAME_ENV] = f"h{rank}"
    hook = ch.build_hook({"compressor": "int2", "links": "inter_host", "timeout_s": timeout_s})
    return _stall_or_call(rank, flag, lambda: hook(ch.CollectiveCall("all_to_all", _x(rank, world), None, key="q")))


def stalled_peer_hostnames(rank: int, world: int, flag: str, timeout_s: float) -> dict[str, Any]:
    """A LinkAwareHook around a hook without a settings handshake (CastHook): its first collective is
    the hostname exchange itself; rank 1 stalls."""
    hook = LinkAwareHook(ch.CastHook(torch.bfloat16, timeout_s), ch.PassthroughHook(timeout_s), Topology(f"h{rank}"))
    return _stall_or_call(rank, flag, lambda: hook(ch.CollectiveCall("all_gather", _x(rank, world), None)))


class Meter(WrappingHook):
    """A metering wrapper (counts calls): what a user puts around the compressed hook."""

    def __init__(self, inner: ch.CommHook) -> None:
        super().__init__(inner)
        self.calls = 0

    def __call__(self, call: ch.CollectiveCall) -> torch.Tensor:
        self.calls += 1
        return super().__call__(call)


def _bytes(stats: dict[str, Any]) -> list[int]:
    return [stats["raw_bytes"], stats["wire_bytes"]]


def per_link_bytes(rank: int, world: int) -> dict[str, Any]:
    """Per-link bytes of a LinkAwareHook whose compressed hook is wrapped (Meter) or has stats
    disabled, on two emulated hosts (every call crosses hosts), against the inner hook's own."""
    out: dict[str, Any] = {}
    cfg = {"compressor": "int2", "warmup_steps": 1}
    for name, compressed in (("wrapped", Meter(ch.CompactHook(cfg))),
                             ("disabled", ch.CompactHook({**cfg, "stats": {"enabled": False}}))):
        hook = LinkAwareHook(compressed, ch.PassthroughHook(), Topology(f"h{rank}"))
        for step in range(3):
            hook(ch.CollectiveCall("all_to_all", _x(rank, world, step), None, key="q"))
            hook(ch.CollectiveCall("all_gather", _x(rank, world, step), None))
            hook.next_step()
        st = hook.stats()
        inter = st["links"]["inter_host"]
        out[name] = {"link": _bytes(inter), "calls": inter["calls"], "ratio": inter["compression_ratio"],
                     "inner": _bytes(compressed.stats()), "inner_ratio": compressed.stats()["compression_ratio"],
                     "steps": [_bytes(row["links"]["inter_host"]) for row in st["per_step"]],
                     "inner_steps": [_bytes(row) for row in compressed.stats()["per_step"]]}
    return out


def per_link_bytes_mixed(rank: int, world: int) -> dict[str, Any]:
    """Every hop compressed by one (wrapped) CompactHook on hosts h0 = {0, 1} and h1 = {2}: calls
    alternate between the intra-host group {0, 1} (key ``a``) and the world (key ``b`` and keyless
    calls); the per-link bytes must be the inner hook's bytes of those keys."""
    intra = dist.new_group([0, 1])
    compressed = Meter(ch.CompactHook({"compressor": "int2", "warmup_steps": 1}))
    hook = LinkAwareHook(compressed, ch.PassthroughHook(), Topology(f"h{rank // 2}"),
                         compress=("intra_host", "inter_host"))
    for step in range(3):
        for _ in range(2):
            if rank < 2:
                hook(ch.CollectiveCall("all_to_all", _x(rank, 2, step), intra, key="a"))
            hook(ch.CollectiveCall("all_to_all", _x(rank, world, step), None, key="b"))
            hook(ch.CollectiveCall("all_gather", _x(rank, world, step), None))
        hook.next_step()
    st = hook.stats()
    per_key = compressed.stats()["per_key"]
    keyless = [k for k in per_key if k not in ("a", "b")]
    want_inter = [sum(per_key[k][f] for k in ["b", *keyless]) for f in ("raw_bytes", "wire_bytes")]
    want_intra = _bytes(per_key["a"]) if "a" in per_key else [0, 0]
    return {"intra": _bytes(st["links"]["intra_host"]), "inter": _bytes(st["links"]["inter_host"]),
            "want_intra": want_intra, "want_inter": want_inter, "keyless": keyless,
            "calls": {c: s["calls"] for c, s in st["links"].items()},
            "step_sum": [sum(r["raw_bytes"] for r in st["per_step"]), sum(r["wire_bytes"] for r in st["per_step"])],
            "inner": _bytes(compressed.stats())}
