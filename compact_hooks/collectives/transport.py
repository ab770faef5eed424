"""Waiting on torch.distributed work with a timeout, and the byte-level exchanges that carry
payloads. A peer that dies or hangs becomes a :class:`~compact_hooks.errors.CollectiveTimeoutError`."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import CollectiveTimeoutError

Group = Optional[dist.ProcessGroup]


def wait(work: Any, timeout_s: Optional[float], what: str) -> None:
    """Wait for an async collective; a peer that died or hangs becomes a clear error.

    Gloo honours ``Work.wait(timeout=...)`` (checked on torch 2.13: it raises "Operation timed
    out!" on time); a peer killed outright is seen at once as a closed connection.
    """
    try:
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        if "timed out" in detail.lower() or "timeout" in detail.lower():
            cause = f"did not complete within timeout_s={timeout_s}: a rank of the group hangs, died or runs a different program"
        else:
            cause = (f"failed before timeout_s={timeout_s}: a rank of the group died or closed its connection "
                     "(killed, out of memory, or crashed)")
        raise CollectiveTimeoutError(
            f"{what} {cause} ({type(exc).__name__}: {detail}). Check the other ranks' logs; raise timeout_s in "
            "the \"compact_hooks\" block if steps are just slow. The process group is unusable after this error."
        ) from exc


@contextmanager
def transport_timeout(group: Group, timeout_s: Optional[float]) -> Iterator[None]:
    """Collectives enqueued inside run with at most ``timeout_s`` as gloo's own timeout.

    ``Work.wait(timeout=...)`` raises on time, but gloo's worker thread stays blocked on a hung
    peer until the process group's timeout (30 minutes by default), and the process cannot exit
    before it. An op enqueued with ``timeout_s`` frees both. Other backends: nothing changes.
    """
    backend, previous = None, None
    if timeout_s is not None and dist.is_initialized():
        try:
            pg = group if group is not None else dist.distributed_c10d._get_default_group()
            if dist.get_backend(pg) == "gloo":
                candidate = pg._get_backend(torch.device("cpu"))
                previous = candidate.options._timeout
                if previous > timedelta(seconds=timeout_s):
                    candidate._set_default_timeout(timedelta(seconds=timeout_s))
                    backend = candidate
        except (AttributeError, RuntimeError, ValueError, TypeError):  # private API moved: keep the old behaviour
            backend = None
    try:
        yield
    finally:
        if backend is not None:
            backend._set_default_timeout(previous)


def run_and_wait(start: Callable[[], Any], group: Group, timeout_s: Optional[float], what: str) -> None:
    """Enqueue an async collective with ``start()`` under ``timeout_s`` and wait for it."""
    if timeout_s is None:
        start().wait()
        return
    with transport_timeout(group, timeout_s):
        work = start()
    wait(work, timeout_s, what)


def all_gather_into(out: torch.Tensor, tensor: torch.Tensor, group: Group, timeout_s: Optional[float],
                    what: str) -> None:
    """``out`` (flat, ``P * tensor.numel()``) receives every rank's flat ``tensor`` in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    run_and_wait(lambda: fn(out, tensor, group=group, async_op=True), group, timeout_s, what)


def all_gather_bytes(payload: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_gather") -> torch.Tensor:
    """Gather equal-length ``uint8`` payloads: returns ``[P, nbytes]``."""
    size = dist.get_world_size(group)
    out = torch.empty((size, payload.numel()), dtype=payload.dtype, device=payload.device)
    all_gather_into(out.view(-1), payload.contiguous(), group, timeout_s, what)
    return out


def all_to_all_bytes(payloads: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_to_all") -> torch.Tensor:
    """Exchange ``[P, nbytes]`` payloads: row ``j`` goes to rank ``j``; returns row ``j`` from rank ``j``."""
    send = payloads.contiguous()
    out = torch.empty_like(send)
    run_and_wait(lambda: dist.all_to_all_single(out, send, group=group, async_op=True), group, timeout_s, what)
    return out


def exchange_ring(send: torch.Tensor, recv: torch.Tensor, next_rank: int, prev_rank: int, group: Group,
                  timeout_s: Optional[float], what: str) -> None:
    """Send contiguous ``send`` to global rank ``next_rank`` while ``recv`` receives from ``prev_rank``."""
    ops = [dist.P2POp(dist.isend, send, next_rank, group), dist.P2POp(dist.irecv, recv, prev_rank, group)]
    with transport_timeout(group, timeout_s):
        works = dist.batch_isend_irecv(ops)
    for work in works:
        wait(work, timeout_s, what)
