"""Sequence-parallel attention cores (Ulysses, K/V all-gather, ring) whose collectives go through a CommHook.

Every rank holds a contiguous shard of each *segment* of the token sequence (text tokens, image tokens);
a segment of ``L`` tokens on ``P`` ranks is padded to ``P * ceil(L / P)`` tokens, so every rank holds
``ceil(L / P)`` of them and the padding sits at the end of the last shards. An attention call sees
the local shards of its segments concatenated in the model's order (Flux: text then image; SD3: image
then text). Attention without a mask is invariant under a permutation of its keys, so gathering the
shards rank by rank gives the exact result; padded keys are masked out, padded queries are dropped
when the output is gathered.

Tensors are ``[batch, seq, heads, head_dim]`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.hooks.fusion import fusable

Mode = Literal["ulysses", "allgather", "ring", "usp"]
MODES: tuple[str, ...] = ("ulysses", "allgather", "ring", "usp")


@dataclass(frozen=True)
class Segment:
    """``length`` tokens sharded over ``world`` ranks (padded to a multiple of ``world``)."""

    length: int
    world: int

    @property
    def local(self) -> int:
        """Tokens per rank, padding included."""
        return -(-self.length // self.world) if self.length else 0

    @property
    def padded(self) -> bool:
        return self.local * self.world != self.length

    def valid_count(self, rank: int) -> int:
        """How many of ``rank``'s ``local`` tokens are real (not padding)."""
        return max(0, min(self.local, self.length - rank * self.local))

    def valid(self, rank: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.local, device=device) < self.valid_count(rank)


@dataclass(frozen=True)
class SequenceLayout:
    """The segments an attention call's local sequence is made of, in order."""

    segments: tuple[Segment, ...]

    @property
    def local(self) -> int:
        return sum(s.local for s in self.segments)

    @property
    def padded(self) -> bool:
        return any(s.padded for s in self.segments)

    def rank_valid_count(self, rank: int) -> int:
        return sum(s.valid_count(rank) for s in self.segments)

    def rank_valid(self, rank: int, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean mask of ``rank``'s real tokens; ``None`` when nothing is padded."""
        if not self.padded:
            return None
        return torch.cat([s.valid(rank, device) for s in self.segments])

    def global_valid(self, world: int, device: torch.device) -> Optional[torch.Tensor]:
        """Mask of the rank-by-rank concatenation of every rank's local sequence."""
        if not self.padded:
            return None
        return torch.cat([self.rank_valid(r, device) for r in range(world)])


@dataclass(frozen=True)
class AttentionComm:
    """Who talks to whom and how: the hook, the group and this rank's place in it."""

    hook: CommHook
    group: Optional[dist.ProcessGroup]
    world: int
    rank: int
    mode: Mode = "ulysses"
    usp: Any = None  # mode "usp": the sub-groups and grid (integrations.diffusers.usp.USPGroups)

    @property
    def timeout_s(self) -> Optional[float]:
        """The hook's ``timeout_s``: the integration's own collectives (input checks, the output
        gather) wait no longer for a peer than the hook's do."""
        return getattr(self.hook, "timeout_s", None)  # wrapping hooks forward their inner hook's


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain SDPA on ``[B, S, H, D]`` tensors; ``key_valid`` masks padded keys."""
    mask = None if key_valid is None else key_valid.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: AttentionComm,
    key: str,
    layout: SequenceLayout,
) -> torch.Tensor:
    """Attention of the local queries over the keys and values of every rank.

    ``q``, ``k``, ``v`` are this rank's ``[B, S_local, H, D]`` shards laid out as ``layout``; the result
    is this rank's ``[B, S_local, H, D]`` output. ``key`` names the call site (``"blocks.3.attn"``);
    the collectives are keyed ``key + ":qkv" | ":o"`` (Ulysses; ``":q" | ":k" | ":v"`` where rules keep the
    roles apart), ``key + ":k" | ":v"`` (all-gather; ring: relays ``":k"``, ``":v"``, whose
    hops are counted as ``":k.hop1"``, ...; see :func:`ring_blocks`).
    """
    if q.shape[1] != layout.local:
        raise RuntimeError(f"{key}: the local sequence has {q.shape[1]} tokens but its layout says {layout.local}")
    if comm.world == 1:
        return local_attention(q, k, v, layout.rank_valid(0, q.device))
    if comm.mode == "ulysses":
        return _ulysses(q, k, v, comm, key, layout)
    if comm.mode == "allgather":
        return _allgather(q, k, v, comm, key, layout)
    if comm.mode == "ring":
        return _ring(q, k, v, comm, key, layout)
    if comm.mode == "usp":
        if comm.usp is None:
            raise RuntimeError(f"{key}: mode 'usp' needs its groups; use parallelize(..., mode='usp')")
        return comm.usp.attention(q, k, v, comm.hook, key, layout)
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {comm.mode!r}")


def check_heads(heads: int, world: int, where: str) -> None:
    """Ulysses splits heads over ranks: raise a clear error when they don't divide."""
    if heads % world:
        raise ValueError(
            f"{where}: Ulysses splits the {heads} attention heads over {world} ranks, which needs the head "
            f"count to be divisible by the group size; use a group of a size that divides {heads}, or "
            f"mode='allgather' or mode='ring'"
        )


def _ulysses(q, k, v, comm: AttentionComm, key: str, layout: SequenceLayout) -> torch.Tensor:
    """Q, K and V to heads in one all-to-all (``key:qkv``; three, ``key:q|k|v``, where the hook's rules
    tell the roles apart, see :func:`compact_hooks.hooks.fusion.fusable`), local attention, and the
    output back (``key:o``, started as soon as it is computed)."""
    P = comm.world
    B, S, H, D = q.shape
    check_heads(H, P, key)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # [B, S, H, D] -> [P, B, S, H/P, D] (a view): chunk j (heads of rank j) goes to rank j.
        return x.unflatten(2, (P, H // P)).permute(2, 0, 1, 3, 4)

    def to_heads(recv: torch.Tensor) -> torch.Tensor:
        # chunk j: rank j's tokens, my heads -> [B, P*S, H/P, D] in rank order
        return recv.permute(1, 0, 2, 3, 4).flatten(1, 2)

    # The hook sees [P, ..., B, S, H/P * D]: a codec's channel dim spans this rank's heads, so a
    # low-rank codec factors [tokens, H/P * D], not one [tokens * heads, D] matrix per head.
    names = [f"{key}:{n}" for n in "qkv"]
    if fusable(comm.hook, names, f"{key}:qkv", "all_to_all", comm.group):
        send = torch.stack([heads_first(x) for x in (q, k, v)], dim=1)  # [P, 3, B, S, H/P, D]
        recv = comm.hook(CollectiveCall("all_to_all", send.flatten(4, 5), comm.group, key=f"{key}:qkv"))
        qh, kh, vh = (to_heads(part) for part in recv.view(send.shape).unbind(1))
    else:
        def exchange(x: torch.Tensor, name: str) -> torch.Tensor:
            send = heads_first(x).contiguous()
            return to_heads(comm.hook(CollectiveCall("all_to_all", send.flatten(3, 4), comm.group,
                                                     key=name)).view(send.shape))
        qh, kh, vh = (exchange(x, name) for x, name in zip((q, k, v), names))
    out = local_attention(qh, kh, vh, layout.global_valid(P, q.device))
    # [B, P*S, H/P, D] -> [P, B, S, H/P, D]: rank j's tokens go back to rank j.
    send = out.unflatten(1, (P, S)).permute(1, 0, 2, 3, 4).contiguous()
    work = comm.hook.start(CollectiveCall("all_to_all", send.flatten(3, 4), comm.group, key=f"{key}:o"))
    # chunk j: my tokens, heads of rank j -> [B, S, H, D]
    return work.wait().view(send.shape).permute(1, 2, 0, 3, 4).flatten(2, 3)


def _allgather(q, k, v, comm: AttentionComm, key: str, layout: SequenceLayout) -> torch.Tensor:
    k_all = comm.hook(CollectiveCall("all_gather", k.contiguous(), comm.group, key=f"{key}:k", dim=1))
    v_all = comm.hook(CollectiveCall("all_gather", v.contiguous(), comm.group, key=f"{key}:v", dim=1))
    return local_attention(q, k_all, v_all, layout.global_valid(comm.world, q.device))


def _block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_valid: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one K/V block in float32: ``(out [B, H, Sq, D], lse [B, H, Sq])``."""
    qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid.view(1, 1, 1, -1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf)
    return out, lse


def _merge(
    acc: Optional[tuple[torch.Tensor, torch.Tensor]], block: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions (each normalised, with its log-sum-exp)."""
    if acc is None:
        return block
    out, lse = acc
    out_b, lse_b = block
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new).unsqueeze(-1) + out_b * torch.exp(lse_b - new).unsqueeze(-1), new


def ring_blocks(k: torch.Tensor, v: torch.Tensor, hook: CommHook, group: Optional[dist.ProcessGroup],
                k_key: str, v_key: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(hop, k block, v block)`` for hops ``0 .. P - 1`` of a ring (hop ``h``: the block of group rank
    ``(r - h) % P``), through the hook's relay ring (``hook.start_relay``): both relays start before
    the own block is yielded and each hop's ``wait()`` posts the next hop, so the next transfer is in
    flight while the caller computes on the current block (double buffering). A hook without a relay
    of its own exchanges each hop when it is needed (keys ``<key>.hopN``)."""
    k, v = k.contiguous(), v.contiguous()
    relay_k = hook.start_relay(CollectiveCall("ring_exchange", k, group, key=k_key))
    relay_v = hook.start_relay(CollectiveCall("ring_exchange", v, group, key=v_key))
    yield 0, k, v
    for hop, (work_k, work_v) in enumerate(zip(relay_k, relay_v), start=1):
        yield hop, work_k.wait(), work_v.wait()


def _ring(q, k, v, comm: AttentionComm, key: str, layout: SequenceLayout) -> torch.Tensor:
    P, r = comm.world, comm.rank
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    for hop, k_cur, v_cur in ring_blocks(k, v, comm.hook, comm.group, f"{key}:k", f"{key}:v"):
        src = (r - hop) % P
        if layout.rank_valid_count(src) == 0:
            continue  # every key of this block is padding (its hop is still waited: the relay forwards it)
        acc = _merge(acc, _block_attention(q, k_cur, v_cur, scale, layout.rank_valid(src, q.device)))
    assert acc is not None  # rank 0 always holds real tokens
    return acc[0].transpose(1, 2).to(q.dtype)
