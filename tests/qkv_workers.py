"""Rank programs of tests/test_ulysses_qkv.py: the Ulysses core of the diffusers integration with
Q, K and V in one all-to-all."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from compact_hooks.integrations.diffusers.attention import (
    AttentionComm,
    Segment,
    SequenceLayout,
    local_attention,
    sequence_parallel_attention,
)

import compact_hooks as ch
from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.work import CollectiveWork

B, H, D = 1, 4, 16


class Counting(CommHook):
    """Records the key of every call it passes to ``inner``."""

    def __init__(self, inner: CommHook) -> None:
        self.inner = inner
        self.keys: list[str] = []

    def start(self, call: CollectiveCall) -> CollectiveWork:
        self.keys.append(str(call.key))
        return self.inner.start(call)

    def next_step(self) -> None:
        self.inner.next_step()


def full_qkv(step: int, tokens: int) -> list[torch.Tensor]:
    """The full sequence's Q, K, V at a drifting 'denoising step' (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(B, tokens, H, D, generator=g) for _ in range(3)]
    drift = [torch.randn(B, tokens, H, D, generator=g) for _ in range(3)]
    return [b + 0.05 * step * d for b, d in zip(base, drift)]


def attend(hook: CommHook, rank: int, world: int, step: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's output through ``hook`` and the single-device reference of its tokens."""
    layout = SequenceLayout((Segment(tokens, world),))
    n = layout.local
    q, k, v = full_qkv(step, tokens)
    pad = lambda x: torch.cat([x, x.new_zeros(B, n * world - tokens, H, D)], dim=1)  # noqa: E731
    mine = [pad(x)[:, rank * n:(rank + 1) * n] for x in (q, k, v)]
    comm = AttentionComm(hook, None, world, rank, "ulysses")
    out = sequence_parallel_attention(*mine, comm, "blocks.0.attn", layout)
    ref = pad(local_attention(q, k, v))[:, rank * n:(rank + 1) * n]
    valid = layout.rank_valid_count(rank)
    return out[:, :valid], ref[:, :valid]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def parity_worker(rank: int, world: int) -> dict[str, Any]:
    """Fused (PassthroughHook) against the three separate calls of before (a rule for role q keeps
    them apart; codec none is exact): bit-identical outputs, and the calls each forward makes."""
    out: dict[str, Any] = {}
    for tokens in (8 * world, 8 * world - 3):  # divisible, and padded
        fused = Counting(ch.PassthroughHook())
        apart = Counting(ch.CompactHook({"compressor": "none", "rules": [{"match": {"role": "q"}, "plain": True}]}))
        a, ref = attend(fused, rank, world, 0, tokens)
        b, _ = attend(apart, rank, world, 0, tokens)
        out[tokens] = {"equal": bool(torch.equal(a, b)), "err": rel(a, ref), "fused_keys": fused.keys,
                       "apart_keys": apart.keys}
    return out


def lossy_worker(rank: int, world: int, codec: str, fuse: bool) -> dict[str, Any]:
    """A codec with error feedback over 8 drifting steps, Q, K and V fused or apart (``fuse`` false: a
    rule for role q with the same codec keeps the three calls apart and changes nothing else)."""
    rules = [] if fuse else [{"match": {"role": "q"}, "compressor": codec}]
    hook = ch.CompactHook({"compressor": codec, "warmup_compressor": None, "rules": rules})
    errors = []
    for step in range(8):
        got, ref = attend(hook, rank, world, step, 8 * world)
        errors.append(rel(got, ref))
        hook.next_step()
    per_key = hook.stats()["per_key"]
    return {"errors": errors, "keys": sorted(per_key),
            "wire": {k: v["wire_bytes"] for k, v in per_key.items()}, "raw": {k: v["raw_bytes"] for k, v in per_key.items()}}


def rules_worker(rank: int, world: int) -> dict[str, Any]:
    """Which keys a forward sends under role rules, and which rule each took (plain calls)."""
    out = {}
    cases = {
        "k_v_lowrank": [{"match": {"role": ["k", "v"]}, "compressor": {"name": "lowrank", "rank": 4}}],
        "all_roles_plain": [{"match": {"role": ["q", "k", "v", "qkv"]}, "plain": True}],
        "key_glob_plain": [{"match": {"key": "blocks.0.*"}, "plain": True}],
        "q_k_v_without_qkv": [{"match": {"role": ["q", "k", "v"]}, "plain": True}],
    }
    for name, rules in cases.items():
        hook = Counting(ch.CompactHook({"compressor": "int2", "rules": rules}))
        attend(hook, rank, world, 0, 8 * world)
        stats = hook.inner.stats()["per_key"]
        out[name] = {"keys": hook.keys, "plain": {k: v["plain_calls"] for k, v in stats.items()}}
    dist.barrier()
    return out
