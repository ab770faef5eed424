"""Plain collectives on torch.distributed: the exact baseline, one function per collective.

Every function takes its process group explicitly and returns at once for a group of size 1.
Inputs of any strides are accepted: what goes to torch.distributed is always a contiguous copy
or view, and every result is a new contiguous tensor (or the input itself for a group of one).
``timeout_s`` bounds the wait for a peer (``None``: the process group's own timeout).

Each collective has a ``start_*`` form that enqueues the async torch.distributed op and returns a
:class:`~compact_hooks.work.CollectiveWork` (the caller leaves the input alone until ``wait()``, as
with ``async_op=True``); the plain form is ``start_*(...).wait()``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..work import CollectiveWork
from .transport import Group, start_transfer


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


def start_all_gather(tensor: torch.Tensor, group: Group, dim: int = 0,
                     timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start :func:`all_gather`; the work's ``wait()`` returns its result."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(tensor)
    flat = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    send = tensor.contiguous().view(-1)
    wire = start_transfer(lambda: fn(flat.view(-1), send, group=group, async_op=True), group, timeout_s, "all_gather")

    def finish() -> torch.Tensor:
        if tensor.dim() > 0 and dim % tensor.dim() == 0:
            return flat.view(size * tensor.shape[0], *tensor.shape[1:])
        return torch.cat(flat.unbind(0), dim=dim)
    return CollectiveWork([wire], finish, tensor.device)


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""
    return start_all_gather(tensor, group, dim, timeout_s).wait()


def start_all_to_all(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start :func:`all_to_all`; the work's ``wait()`` returns its result."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(tensor)
    check_rows(tensor, size)
    send = tensor.contiguous()
    out = torch.empty_like(send, memory_format=torch.contiguous_format)
    wire = start_transfer(lambda: dist.all_to_all_single(out, send, group=group, async_op=True), group, timeout_s,
                          "all_to_all")
    return CollectiveWork([wire], lambda: out, tensor.device)


def all_to_all(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Chunk ``j`` of dim 0 goes to rank ``j``; returns chunk ``j`` from rank ``j`` in the same layout."""
    return start_all_to_all(tensor, group, timeout_s).wait()


def start_all_reduce_(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start :func:`all_reduce_` (in place into ``tensor``, which the caller must leave alone until
    ``wait()``); the work's ``wait()`` returns ``tensor``."""
    if group_size(group) == 1:
        return CollectiveWork.completed(tensor)
    buf = tensor if tensor.is_contiguous() else tensor.contiguous()
    wire = start_transfer(lambda: dist.all_reduce(buf, group=group, async_op=True), group, timeout_s, "all_reduce")

    def finish() -> torch.Tensor:
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor
    return CollectiveWork([wire], finish, tensor.device)


def all_reduce(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Elementwise sum over the group (out of place)."""
    return start_all_reduce(tensor, group, timeout_s).wait()


def start_all_reduce(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start :func:`all_reduce` (out of place)."""
    if group_size(group) == 1:
        return CollectiveWork.completed(tensor)
    return start_all_reduce_(tensor.clone(memory_format=torch.contiguous_format), group, timeout_s)


def all_reduce_(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Elementwise sum over the group, in place (for a buffer the caller owns; a non-contiguous
    buffer is reduced through a contiguous copy and written back)."""
    return start_all_reduce_(tensor, group, timeout_s).wait()


def start_ring_exchange(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start :func:`ring_exchange`; the work's ``wait()`` returns what the previous rank sent."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(tensor)
    send = tensor.contiguous()
    out = torch.empty_like(send, memory_format=torch.contiguous_format)
    wire = start_transfer(lambda: dist.batch_isend_irecv(ring_ops(send, out, group)), group, timeout_s,
                          "ring_exchange")
    return CollectiveWork([wire], lambda: out, tensor.device)


def ring_ops(send: torch.Tensor, recv: torch.Tensor, group: Group) -> list[dist.P2POp]:
    """The two point-to-point ops of a ring step: ``send`` to the next rank, ``recv`` from the previous."""
    size, rank = group_size(group), group_rank(group)
    return [dist.P2POp(dist.isend, send, global_rank(group, (rank + 1) % size), group),
            dist.P2POp(dist.irecv, recv, global_rank(group, (rank - 1) % size), group)]


def ring_exchange(tensor: torch.Tensor, group: Group, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Send ``tensor`` to the next rank of the ring; return what the previous rank sent."""
    return start_ring_exchange(tensor, group, timeout_s).wait()


def start_plain(op: str, tensor: torch.Tensor, group: Group, dim: int = 0,
                timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start the plain collective ``op`` (``dim``: all_gather's concatenation dim)."""
    if op == "all_gather":
        return start_all_gather(tensor, group, dim, timeout_s)
    if op == "all_to_all":
        return start_all_to_all(tensor, group, timeout_s)
    if op == "all_reduce":
        return start_all_reduce(tensor, group, timeout_s)
    return start_ring_exchange(tensor, group, timeout_s)
