"""Collectives on torch.distributed, one function per collective and layout; the group is explicit.

Plain versions (``all_gather``, ``all_to_all``, ``all_reduce``, ``ring_exchange``) are the exact
baseline; the ``compressed_*`` versions move codec payloads and reconstruct through a
:class:`~compact_hooks.residual.Session`. A group of size 1 returns at once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: Group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def global_rank(group: Group, group_rank_: int) -> int:
    """The global rank of ``group_rank_`` in ``group``."""
    if group is None or group is dist.group.WORLD:
        return group_rank_
    return dist.get_global_rank(group, group_rank_)


def _all_gather_flat(out: torch.Tensor, tensor: torch.Tensor, group: Group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, tensor, group=group)


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    flat = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(flat.view(-1), tensor.contiguous().view(-1), group)
    if dim % max(tensor.dim(), 1) == 0 and tensor.dim() > 0:
        return flat.view(size * tensor.shape[0], *tensor.shape[1:])
    return torch.cat(flat.unbind(0), dim=dim)


def all_gather_bytes(payload: torch.Tensor, group: Group) -> torch.Tensor:
    """Gather equal-length ``uint8`` payloads: returns ``[P, nbytes]``."""
    size = group_size(group)
    out = torch.empty((size, payload.numel()), dtype=payload.dtype, device=payload.device)
    _all_gather_flat(out.view(-1), payload, group)
    return out


def all_to_all(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Chunk ``j`` of dim 0 goes to rank ``j``; returns chunk ``j`` from rank ``j`` in the same layout."""
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[0] % size:
        raise ValueError(
            f"all_to_all splits dim 0 into {size} equal chunks, but it has {tensor.shape[0]} rows; "
            f"pad or choose a size divisible by the group size"
        )
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor.contiguous(), group=group)
    return out


def all_to_all_bytes(payloads: torch.Tensor, group: Group) -> torch.Tensor:
    """Exchange ``[P, nbytes]`` payloads: row ``j`` goes to rank ``j``; returns row ``j`` from rank ``j``."""
    out = torch.empty_like(payloads)
    dist.all_to_all_single(out, payloads.contiguous(), group=group)
    return out


def all_reduce(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise sum over the group (out of place)."""
    if group_size(group) == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


def ring_exchange(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Send ``tensor`` to the next rank of the ring; return what the previous rank sent."""
    size = group_size(group)
    if size == 1:
        return tensor
    rank = group_rank(group)
    out = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, out, global_rank(group, (rank - 1) % size), group),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return out
