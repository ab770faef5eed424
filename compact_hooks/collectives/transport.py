"""Waiting on torch.distributed work with a timeout, and the byte-level exchanges that carry
payloads. A peer that dies or hangs becomes a :class:`~compact_hooks.errors.CollectiveTimeoutError`."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import CollectiveTimeoutError

Group = Optional[dist.ProcessGroup]


def group_ranks(group: Group) -> tuple[int, ...]:
    """The global ranks of ``group`` in group-rank order (``(0,)`` without torch.distributed): the key
    of per-group state."""
    if not dist.is_initialized():
        return (0,)
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def device_of(group: Group) -> torch.device:
    """The device a group's collectives run on (the current GPU for nccl, else the CPU)."""
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


class Transfer:
    """One wire stage in flight (the works of its async ops): ``is_completed()`` without blocking,
    ``wait()`` once, each work through :func:`wait` (later calls return at once: a gloo work must
    not be waited on twice). A :class:`~compact_hooks.work.CollectiveWork` waits on these."""

    def __init__(self, works: list[Any], timeout_s: Optional[float], what: str) -> None:
        self.works = works
        self.timeout_s = timeout_s
        self.what = what
        self.done = False

    def is_completed(self) -> bool:
        return self.done or all(work.is_completed() for work in self.works)

    def wait(self) -> None:
        if self.done:
            return
        self.done = True
        for work in self.works:
            if self.timeout_s is None:
                work.wait()  # the process group's own timeout and error, as a plain torch.distributed call
            else:
                wait(work, self.timeout_s, self.what)


def start_transfer(enqueue: Callable[[], Any], group: Group, timeout_s: Optional[float], what: str) -> Transfer:
    """Run ``enqueue()`` (async torch.distributed calls returning a work or a list of works) with
    ``timeout_s`` as the backend's own timeout (:func:`transport_timeout`); return the stage in flight."""
    with transport_timeout(group, timeout_s):
        works = enqueue()
    return Transfer(works if isinstance(works, list) else [works], timeout_s, what)


def run_and_wait(start: Callable[[], Any], group: Group, timeout_s: Optional[float], what: str) -> None:
    """Enqueue an async collective with ``start()`` under ``timeout_s`` and wait for it."""
    start_transfer(start, group, timeout_s, what).wait()


def all_gather_into(out: torch.Tensor, tensor: torch.Tensor, group: Group, timeout_s: Optional[float],
                    what: str) -> None:
    """``out`` (flat, ``P * tensor.numel()``) receives every rank's flat ``tensor`` in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    run_and_wait(lambda: fn(out, tensor, group=group, async_op=True), group, timeout_s, what)


def start_all_gather_bytes(payload: torch.Tensor, group: Group, timeout_s: Optional[float],
                           what: str) -> tuple[Transfer, torch.Tensor]:
    """Start gathering equal-length ``uint8`` payloads into ``[P, nbytes]`` (filled once waited)."""
    size = dist.get_world_size(group)
    out = torch.empty((size, payload.numel()), dtype=payload.dtype, device=payload.device)
    send = payload.contiguous()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return start_transfer(lambda: fn(out.view(-1), send, group=group, async_op=True), group, timeout_s, what), out


def all_gather_bytes(payload: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_gather") -> torch.Tensor:
    """Gather equal-length ``uint8`` payloads: returns ``[P, nbytes]``."""
    transfer, out = start_all_gather_bytes(payload, group, timeout_s, what)
    transfer.wait()
    return out


def gather_texts(text: bytes, nbytes: int, group: Group, timeout_s: Optional[float], what: str) -> list[str]:
    """Every rank's ``text`` in group-rank order, through one all_gather of ``nbytes``-byte buffers. A
    longer text is cut and ends in a digest of the whole, so texts that differ anywhere still differ."""
    if len(text) > nbytes:
        tail = b"...(truncated; sha1 " + hashlib.sha1(text).hexdigest().encode() + b")"
        text = text[: nbytes - len(tail)] + tail
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    if text:
        buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    gathered = all_gather_bytes(buf.to(device_of(group)), group, timeout_s, what).cpu()
    return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in gathered]


def start_all_to_all_bytes(payloads: torch.Tensor, group: Group, timeout_s: Optional[float],
                           what: str) -> tuple[Transfer, torch.Tensor]:
    """Start exchanging ``[P, nbytes]`` payloads (row ``j`` to rank ``j``); the output is filled once waited."""
    send = payloads.contiguous()
    out = torch.empty_like(send)
    return start_transfer(lambda: dist.all_to_all_single(out, send, group=group, async_op=True), group, timeout_s,
                          what), out


def all_to_all_bytes(payloads: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_to_all") -> torch.Tensor:
    """Exchange ``[P, nbytes]`` payloads: row ``j`` goes to rank ``j``; returns row ``j`` from rank ``j``."""
    transfer, out = start_all_to_all_bytes(payloads, group, timeout_s, what)
    transfer.wait()
    return out


def start_exchange_ring(send: torch.Tensor, recv: torch.Tensor, next_rank: int, prev_rank: int, group: Group,
                        timeout_s: Optional[float], what: str) -> Transfer:
    """Start sending contiguous ``send`` to global rank ``next_rank`` while ``recv`` receives from ``prev_rank``."""
    ops = [dist.P2POp(dist.isend, send, next_rank, group), dist.P2POp(dist.irecv, recv, prev_rank, group)]
    return start_transfer(lambda: dist.batch_isend_irecv(ops), group, timeout_s, what)


def exchange_ring(send: torch.Tensor, recv: torch.Tensor, next_rank: int, prev_rank: int, group: Group,
                  timeout_s: Optional[float], what: str) -> None:
    """Send contiguous ``send`` to global rank ``next_rank`` while ``recv`` receives from ``prev_rank``."""
    start_exchange_ring(send, recv, next_rank, prev_rank, group, timeout_s, what).wait()


# -- payloads of varying length (adaptive codecs): sizes first, then exactly the bytes -----------
# The sizes are exchanged and read on the host before the payload transfer starts: the start_*
# forms below block for that small exchange, then return the payload transfer in flight.
SIZE_NBYTES = 8  # one int64 length per payload, counted in the wire bytes


def _lengths(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, written by fill kernels: no tensor made from host
    data, hence no pageable host-to-device copy (nor the sync of ``t[i] = v``) on a GPU."""
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, value in enumerate(values):
        out[i:i + 1].fill_(value)
    return out


def start_all_gather_sized(payload: torch.Tensor, counts: list[int], group: Group, timeout_s: Optional[float],
                           what: str) -> tuple[Transfer, list[torch.Tensor]]:
    """Every rank's payload, own one included, in rank order, ``counts[j]`` bytes from rank ``j`` (every
    rank knows them: no length exchange); each rank sends its payload once to every peer. Filled once
    the transfer is waited."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    send = payload.repeat(size - 1)
    in_splits = [0 if j == rank else payload.numel() for j in range(size)]
    out_splits = [0 if j == rank else counts[j] for j in range(size)]
    out = torch.empty(sum(out_splits), dtype=payload.dtype, device=payload.device)
    transfer = start_transfer(lambda: dist.all_to_all_single(out, send, out_splits, in_splits, group=group,
                                                             async_op=True), group, timeout_s, what)
    parts = list(out.split(out_splits))
    parts[rank] = payload
    return transfer, parts


def start_all_to_all_sized(payloads: list[Optional[torch.Tensor]], counts: list[int], group: Group,
                           timeout_s: Optional[float], what: str) -> tuple[Transfer, list[Optional[torch.Tensor]]]:
    """``payloads[j]`` (``None`` for this rank) goes to rank ``j``; ``counts[j]`` bytes come from rank ``j``
    (every rank knows them: no length exchange). What each rank sent here (``None`` at this rank) is
    filled once the transfer is waited."""
    rank = dist.get_rank(group)
    in_splits = [0 if p is None else p.numel() for p in payloads]
    out_splits = [0 if j == rank else n for j, n in enumerate(counts)]
    send = torch.cat([p for p in payloads if p is not None])
    out = torch.empty(sum(out_splits), dtype=send.dtype, device=send.device)
    transfer = start_transfer(lambda: dist.all_to_all_single(out, send, out_splits, in_splits, group=group,
                                                             async_op=True), group, timeout_s, what)
    received: list[Optional[torch.Tensor]] = list(out.split(out_splits))
    received[rank] = None
    return transfer, received


def gather_lengths(n: int, group: Group, timeout_s: Optional[float], what: str,
                   device: torch.device) -> list[int]:
    """Every rank's length ``n`` in group-rank order: one small all-gather (blocking, one host read)."""
    lengths = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    all_gather_into(lengths, _lengths([n], device), group, timeout_s, f"{what} (sizes)")
    return lengths.tolist()


def start_all_gather_varlen(payload: torch.Tensor, group: Group, timeout_s: Optional[float],
                            what: str) -> tuple[Transfer, list[torch.Tensor]]:
    """Every rank's payload (lengths may differ), own one included, in rank order, filled once the
    transfer is waited. The lengths are gathered first (:func:`gather_lengths`); then
    :func:`start_all_gather_sized`."""
    counts = gather_lengths(payload.numel(), group, timeout_s, what, payload.device)
    return start_all_gather_sized(payload, counts, group, timeout_s, what)


def all_gather_varlen(payload: torch.Tensor, group: Group, timeout_s: Optional[float], what: str) -> list[torch.Tensor]:
    """Every rank's payload (lengths may differ), own one included, in rank order."""
    transfer, parts = start_all_gather_varlen(payload, group, timeout_s, what)
    transfer.wait()
    return parts


def start_all_to_all_varlen(payloads: list[Optional[torch.Tensor]], group: Group, timeout_s: Optional[float],
                            what: str) -> tuple[Transfer, list[Optional[torch.Tensor]]]:
    """``payloads[j]`` (any length; ``None`` for this rank) goes to rank ``j``; what each rank sent
    here (``None`` at this rank) is filled once the transfer is waited. Lengths first (blocking), then
    :func:`start_all_to_all_sized`."""
    size = dist.get_world_size(group)
    device = next(p.device for p in payloads if p is not None)
    lengths = torch.empty(size, dtype=torch.int64, device=device)
    sent = _lengths([0 if p is None else p.numel() for p in payloads], device)
    run_and_wait(lambda: dist.all_to_all_single(lengths, sent, group=group, async_op=True), group, timeout_s,
                 f"{what} (sizes)")
    return start_all_to_all_sized(payloads, lengths.tolist(), group, timeout_s, what)


def all_to_all_varlen(payloads: list[Optional[torch.Tensor]], group: Group, timeout_s: Optional[float],
                      what: str) -> list[Optional[torch.Tensor]]:
    """``payloads[j]`` (any length; ``None`` for this rank) goes to rank ``j``; returns what each
    rank sent here (``None`` at this rank)."""
    transfer, received = start_all_to_all_varlen(payloads, group, timeout_s, what)
    transfer.wait()
    return received


def start_exchange_ring_varlen(send: torch.Tensor, next_rank: int, prev_rank: int, group: Group,
                               timeout_s: Optional[float], what: str) -> tuple[Transfer, torch.Tensor]:
    """Start sending ``send`` (any length) to ``next_rank``; the length comes first (blocking), the
    buffer of what ``prev_rank`` sent is filled once the transfer is waited."""
    length = torch.empty(1, dtype=torch.int64, device=send.device)
    exchange_ring(_lengths([send.numel()], send.device), length, next_rank, prev_rank, group, timeout_s,
                  f"{what} (sizes)")
    recv = torch.empty(int(length.item()), dtype=send.dtype, device=send.device)
    return start_exchange_ring(send, recv, next_rank, prev_rank, group, timeout_s, what), recv


def exchange_ring_varlen(send: torch.Tensor, next_rank: int, prev_rank: int, group: Group,
                         timeout_s: Optional[float], what: str) -> torch.Tensor:
    """Send ``send`` (any length) to ``next_rank``; return what ``prev_rank`` sent (length first)."""
    transfer, recv = start_exchange_ring_varlen(send, next_rank, prev_rank, group, timeout_s, what)
    transfer.wait()
    return recv
