"""Unified sequence parallelism (USP): Ulysses inside a group of ranks, ring attention across groups.

``P = U * R`` ranks form a grid: ``R`` Ulysses groups of ``U`` ranks (by default the ranks of one
host, which talk over fast links) and ``U`` ring groups of ``R`` ranks (one rank of each Ulysses
group, all holding the same heads). One attention call:

1. Ulysses: all-to-all of Q, K, V inside the Ulysses group (``key:q|k|v``): every rank then holds the
   tokens of its whole Ulysses group for ``H / U`` heads;
2. ring: that K/V block relayed around the ring group in ``R - 1`` hops (``hook.start_relay``, keys
   ``key:ring_k`` / ``key:ring_v``, counted per hop as ``key:ring_k.hopN``; the next hop in flight
   while a block's attention runs), each block's attention merged with an online softmax (float32). A ring
   exchange follows the ring group's rank order (global ranks ascending, as ``dist.new_group`` orders
   them), which is not the grid's row order when hosts hold ranks round-robin, so the grid row a block
   came from (whose padding it masks) is read from the group's actual order (:func:`ring_sources`);
3. Ulysses: all-to-all of the output back to the token owners (``key:o``).

Every collective goes through the hook with its own sub-group, so a
:class:`~compact_hooks.hooks.links.LinkAwareHook` compresses the ring hops (across hosts) and leaves
the Ulysses all-to-alls (inside a host) exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from compact_hooks.collectives import global_rank, group_rank, group_ranks, group_size
from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.topology import Topology

from .attention import SequenceLayout, _block_attention, _merge, check_heads, local_attention, ring_blocks

Grid = tuple[tuple[int, ...], ...]


def usp_grid(hosts: Sequence[str], ulysses_degree: int, ring_degree: int) -> Grid:
    """``grid[i][u]``: the rank at ring position ``i`` and Ulysses position ``u``.

    ``hosts[r]`` is rank ``r``'s hostname. When every host holds a multiple of ``ulysses_degree``
    ranks, each Ulysses group lies inside one host (hosts in order of their first rank); otherwise
    the Ulysses groups are consecutive ranks.
    """
    world = len(hosts)
    check_degrees(ulysses_degree, ring_degree, world)
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    if all(len(ranks) % ulysses_degree == 0 for ranks in by_host.values()):
        order = [r for ranks in by_host.values() for r in ranks]
    else:
        order = list(range(world))
    return tuple(tuple(order[i * ulysses_degree:(i + 1) * ulysses_degree]) for i in range(ring_degree))


def ring_sources(grid: Grid, ring_order: Sequence[int], me: int) -> tuple[int, ...]:
    """The grid row of the K/V block rank ``me`` holds after each of ``len(grid)`` ring hops.

    ``ring_order`` is ``me``'s ring group (a grid column) in its rank order, the order a ring exchange
    follows: position ``p`` sends to ``p + 1`` and receives from ``p - 1``, so after ``h`` hops ``me``
    holds the block of the member ``h`` positions before it.
    """
    row_of = {rank: i for i, row in enumerate(grid) for rank in row}
    rows = [row_of.get(r) for r in ring_order]
    if me not in ring_order or None in rows or sorted(rows) != list(range(len(grid))):  # type: ignore[type-var]
        raise ValueError(f"ring order {tuple(ring_order)} must hold one rank of each row of the grid {grid}, "
                         f"rank {me} among them")
    pos, size = list(ring_order).index(me), len(ring_order)
    return tuple(row_of[ring_order[(pos - hop) % size]] for hop in range(size))


def check_degrees(ulysses_degree: int, ring_degree: int, world: int) -> None:
    """Raise a ValueError that says what to change unless ``ulysses_degree * ring_degree == world``."""
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if ulysses_degree * ring_degree != world:
        raise ValueError(
            f"mode='usp' needs ulysses_degree * ring_degree == the group size: {ulysses_degree} * {ring_degree} = "
            f"{ulysses_degree * ring_degree}, but the group has {world} ranks; choose degrees whose product is {world}"
        )


def check_usp_heads(heads: object, ulysses_degree: Optional[int], where: str) -> None:
    """Ulysses splits heads over the Ulysses group: raise what to change when they don't divide."""
    if isinstance(heads, int) and isinstance(ulysses_degree, int) and ulysses_degree > 0 and heads % ulysses_degree:
        raise ValueError(
            f"{where}: mode='usp' splits the {heads} attention heads over ulysses_degree={ulysses_degree} ranks, "
            f"which needs the head count to be divisible by ulysses_degree; choose a ulysses_degree that divides "
            f"{heads} (and ring_degree = group size / ulysses_degree)"
        )


def default_degrees(hosts: Sequence[str]) -> tuple[int, int]:
    """``(ranks per host, hosts)`` when every host holds as many ranks, else ``(world, 1)``."""
    counts = {h: hosts.count(h) for h in hosts}
    per = set(counts.values())
    if len(per) == 1:
        return per.pop(), len(counts)
    return len(hosts), 1


@dataclass(frozen=True)
class USPGroups:
    """This rank's Ulysses and ring groups and the whole grid (ranks of the parallelized group)."""

    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    grid: Grid
    ring_rank: int  # my row of the grid (not necessarily my position in my ring group)
    ulysses_rank: int  # my column (position in my Ulysses group)
    sources: tuple[int, ...]  # sources[h]: the grid row of the K/V block I hold after h ring hops

    def __post_init__(self) -> None:
        if sorted(self.sources) != list(range(len(self.grid))) or self.sources[0] != self.ring_rank:
            raise ValueError(f"USPGroups: sources {self.sources} must visit every row of the {len(self.grid)}-row "
                             f"grid once, starting at this rank's row {self.ring_rank}")

    @property
    def ulysses_degree(self) -> int:
        return len(self.grid[0])

    @property
    def ring_degree(self) -> int:
        return len(self.grid)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hook: CommHook, key: str,
                  layout: SequenceLayout) -> torch.Tensor:
        """USP attention of this rank's ``[B, S, H, D]`` shards (see the module docstring)."""
        return usp_attention(q, k, v, self, hook, key, layout)


def build_usp_groups(group: Optional[dist.ProcessGroup], ulysses_degree: Optional[int], ring_degree: Optional[int],
                     topology: Optional[Topology] = None) -> USPGroups:
    """Gather the hostnames of ``group`` once, lay out the grid and create its sub-groups.

    A missing degree follows from the other (or both from the host layout). The sub-groups are created
    with ``dist.new_group`` on every rank in the same order, so call this on every rank of ``group``
    (and, for the default group, every rank of the job).
    """
    topology = topology if topology is not None else Topology()
    world = group_size(group)
    hosts = topology.hosts(group)
    if ulysses_degree is None and ring_degree is None:
        ulysses_degree, ring_degree = default_degrees(hosts)
    elif ulysses_degree is None:
        ulysses_degree = world // ring_degree if ring_degree and world % ring_degree == 0 else -1
    elif ring_degree is None:
        ring_degree = world // ulysses_degree if ulysses_degree and world % ulysses_degree == 0 else -1
    if ulysses_degree == -1 or ring_degree == -1:
        raise ValueError(f"mode='usp': {world} ranks cannot be split by ulysses_degree={ulysses_degree} / "
                         f"ring_degree={ring_degree}; give degrees whose product is {world}")
    to_global = [global_rank(group, r) for r in range(world)]
    # each row in the rank order dist.new_group gives its Ulysses group: a block's token order
    grid = tuple(tuple(sorted(row, key=to_global.__getitem__))
                 for row in usp_grid(hosts, ulysses_degree, ring_degree))
    me = group_rank(group)
    row = next(i for i, ranks in enumerate(grid) if me in ranks)
    col = grid[row].index(me)
    local_sync = not (group is None or group is dist.group.WORLD)
    made: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = {}

    def new_group(ranks: Sequence[int]) -> Optional[dist.ProcessGroup]:
        members = tuple(to_global[r] for r in ranks)
        if members not in made:
            made[members] = dist.new_group(list(members), use_local_synchronization=local_sync) \
                if local_sync else dist.new_group(list(members))
        return made[members]

    uly = [new_group(ranks) for ranks in grid]
    ring = [new_group([grid[i][u] for i in range(ring_degree)]) for u in range(ulysses_degree)]
    to_group = {g: r for r, g in enumerate(to_global)}
    ring_order = [to_group[g] for g in group_ranks(ring[col])] if ring_degree > 1 else [me]
    return USPGroups(uly[row], ring[col], grid, row, col, ring_sources(grid, ring_order, me))


# ---- the attention core -------------------------------------------------------------------------


def _to_heads(x: torch.Tensor, hook: CommHook, group: Optional[dist.ProcessGroup], U: int, key: str) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B, U*S, H/U, D]``: my heads of every Ulysses peer's tokens (peer order)."""
    if U == 1:
        return x
    send = x.unflatten(2, (U, x.shape[2] // U)).permute(2, 0, 1, 3, 4).contiguous()  # chunk j -> peer j
    recv = hook(CollectiveCall("all_to_all", send.flatten(3, 4), group, key=key)).view(send.shape)
    return recv.permute(1, 0, 2, 3, 4).flatten(1, 2)


def _to_tokens(out: torch.Tensor, hook: CommHook, group: Optional[dist.ProcessGroup], U: int, S: int,
               key: str) -> torch.Tensor:
    """``[B, U*S, H/U, D]`` -> ``[B, S, H, D]``: peer ``j``'s tokens go back to peer ``j``."""
    if U == 1:
        return out
    send = out.unflatten(1, (U, S)).permute(1, 0, 2, 3, 4).contiguous()
    recv = hook(CollectiveCall("all_to_all", send.flatten(3, 4), group, key=key)).view(send.shape)
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)


def _block_valid(layout: SequenceLayout, ranks: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    """Mask of the real tokens of the Ulysses block made of ``ranks``' shards (``None``: no padding)."""
    if not layout.padded:
        return None
    return torch.cat([layout.rank_valid(r, device) for r in ranks])  # type: ignore[misc]


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, usp: USPGroups, hook: CommHook, key: str,
                  layout: SequenceLayout) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys: Ulysses in the row, ring across rows."""
    U, R = usp.ulysses_degree, usp.ring_degree
    B, S, H, D = q.shape
    check_heads(H, U, key)
    qh = _to_heads(q, hook, usp.ulysses, U, f"{key}:q")
    kh = _to_heads(k, hook, usp.ulysses, U, f"{key}:k")
    vh = _to_heads(v, hook, usp.ulysses, U, f"{key}:v")
    if R == 1:
        out = local_attention(qh, kh, vh, _block_valid(layout, usp.grid[0], q.device))
    else:
        scale = 1.0 / math.sqrt(D)
        acc: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        for hop, k_cur, v_cur in ring_blocks(kh, vh, hook, usp.ring, f"{key}:ring_k", f"{key}:ring_v"):
            src = usp.grid[usp.sources[hop]]
            if sum(layout.rank_valid_count(r) for r in src) == 0:
                continue  # every key of this block is padding
            acc = _merge(acc, _block_attention(qh, k_cur, v_cur, scale, _block_valid(layout, src, q.device)))
        if acc is None:  # cannot happen: rank 0 holds real tokens and every block is visited
            raise RuntimeError(f"{key}: no real key tokens in any ring block")
        out = acc[0].transpose(1, 2).to(q.dtype)
    return _to_tokens(out, hook, usp.ulysses, U, S, f"{key}:o")
