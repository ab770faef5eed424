"""Plain collectives on torch.distributed: the exact baseline, one function per collective.

Every function takes its process group explicitly and returns at once for a group of size 1.
Inputs of any strides are accepted: what goes to torch.distributed is always a contiguous copy
or view, and every result is a new contiguous tensor (or the input itself for a group of one).
``timeout_s`` bounds the wait for a peer (``None``: the process group's own timeout).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .transport import Group, all_gather_into, exchange_ring, run_and_wait


def group_size(group: Group) -> int:
    """Ranks in ``group`` (1 without torch.distributed); a group this rank is not in is an error."""
    if not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was passed but torch.distributed is not initialised: "
                               "call torch.distributed.init_process_group first")
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError("this rank is not a member of the process group passed to the collective: pass a group "
                         "this rank belongs to (every rank of a new_group call gets a handle; only members may use it)")
    return size


def group_rank(group: Group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def global_rank(group: Group, group_rank_: int) -> int:
    """The global rank of ``group_rank_`` in ``group``."""
    if group is None or group is dist.group.WORLD:
        return group_rank_
    return dist.get_global_rank(group, group_rank_)


def plain_bytes(op: str, nbytes: int, size: int) -> int:
    """Bytes one rank sends for the plain collective of an ``nbytes`` tensor (ring / pairwise
    algorithms). This is the one definition of *raw bytes* in the stats of every op."""
    return {"all_gather": (size - 1) * nbytes, "all_to_all": (size - 1) * nbytes // size,
            "all_reduce": 2 * (size - 1) * nbytes // size, "ring_exchange": nbytes}[op]


def check_rows(tensor: torch.Tensor, size: int) -> None:
    """``all_to_all`` needs dim 0 divisible by the group size."""
    if tensor.dim() == 0 or tensor.shape[0] % size:
        rows = tensor.shape[0] if tensor.dim() else 0
        raise ValueError(
            f"all_to_all splits dim 0 into {size} equal chunks, but it has {rows} rows; "
            "pad or choose a size divisible by the group size"
        )


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    flat = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    all_gather_into(flat.view(-1), tensor.contiguous().view(-1), group, timeout_s, "all_gather")
    if tensor.dim() > 0 and dim % tensor.dim() == 0:
        return flat.view(size * tensor.shape[0], *tensor.shape[1:])
    return torch.cat(flat.unbind(0), dim=dim)


def all_to_all(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Chunk ``j`` of dim 0 goes to rank ``j``; returns chunk ``j`` from rank ``j`` in the same layout."""
    size = group_size(group)
    if size == 1:
        return tensor
    check_rows(tensor, size)
    send = tensor.contiguous()
    out = torch.empty_like(send, memory_format=torch.contiguous_format)
    run_and_wait(lambda: dist.all_to_all_single(out, send, group=group, async_op=True), group, timeout_s, "all_to_all")
    return out


def all_reduce(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Elementwise sum over the group (out of place)."""
    if group_size(group) == 1:
        return tensor
    return all_reduce_(tensor.clone(memory_format=torch.contiguous_format), group, timeout_s)


def all_reduce_(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Elementwise sum over the group, in place (for a buffer the caller owns; a non-contiguous
    buffer is reduced through a contiguous copy and written back)."""
    if group_size(group) == 1:
        return tensor
    buf = tensor if tensor.is_contiguous() else tensor.contiguous()
    run_and_wait(lambda: dist.all_reduce(buf, group=group, async_op=True), group, timeout_s, "all_reduce")
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def ring_exchange(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Send ``tensor`` to the next rank of the ring; return what the previous rank sent."""
    size = group_size(group)
    if size == 1:
        return tensor
    rank = group_rank(group)
    send = tensor.contiguous()
    out = torch.empty_like(send, memory_format=torch.contiguous_format)
    exchange_ring(send, out, global_rank(group, (rank + 1) % size), global_rank(group, (rank - 1) % size),
                  group, timeout_s, "ring_exchange")
    return out
