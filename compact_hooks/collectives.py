"""Collectives on torch.distributed, one function per collective and layout; the group is explicit.

Plain versions (``all_gather``, ``all_to_all``, ``all_reduce``, ``ring_exchange``) are the exact
baseline; the ``compressed_*`` versions move codec payloads and reconstruct through a
:class:`~compact_hooks.residual.Session`. A group of size 1 returns at once.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from .errors import CollectiveTimeoutError, ProtocolError
from .residual import Session
from .wire import HEADER_NBYTES, WIRE_VERSION, parse_header

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


def plain_bytes(op: str, nbytes: int, size: int) -> int:
    """Bytes one rank sends for an uncompressed collective of an ``nbytes`` tensor (ring/pairwise)."""
    return {"all_gather": (size - 1) * nbytes, "all_to_all": (size - 1) * nbytes // size,
            "all_reduce": 2 * (size - 1) * nbytes // size, "ring_exchange": nbytes}[op]


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


def all_gather_bytes(payload: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_gather") -> torch.Tensor:
    """Gather equal-length ``uint8`` payloads: returns ``[P, nbytes]``."""
    size = group_size(group)
    out = torch.empty((size, payload.numel()), dtype=payload.dtype, device=payload.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with transport_timeout(group, timeout_s):
        work = fn(out.view(-1), payload, group=group, async_op=True)
    wait(work, timeout_s, what)
    return out


def all_to_all(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Chunk ``j`` of dim 0 goes to rank ``j``; returns chunk ``j`` from rank ``j`` in the same layout."""
    size = group_size(group)
    if size == 1:
        return tensor
    _check_rows(tensor, size)
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor.contiguous(), group=group)
    return out


def _check_rows(tensor: torch.Tensor, size: int) -> None:
    if tensor.dim() == 0 or tensor.shape[0] % size:
        rows = tensor.shape[0] if tensor.dim() else 0
        raise ValueError(
            f"all_to_all splits dim 0 into {size} equal chunks, but it has {rows} rows; "
            "pad or choose a size divisible by the group size"
        )


def all_to_all_bytes(payloads: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                     what: str = "all_to_all") -> torch.Tensor:
    """Exchange ``[P, nbytes]`` payloads: row ``j`` goes to rank ``j``; returns row ``j`` from rank ``j``."""
    out = torch.empty_like(payloads)
    with transport_timeout(group, timeout_s):
        work = dist.all_to_all_single(out, payloads.contiguous(), group=group, async_op=True)
    wait(work, timeout_s, what)
    return out


def all_reduce(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise sum over the group (out of place)."""
    if group_size(group) == 1:
        return tensor
    return all_reduce_(tensor.clone(), group)


def all_reduce_(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise sum over the group, in place (for a buffer the caller owns)."""
    dist.all_reduce(tensor, group=group)
    return tensor


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


# ---------------------------------------------------------------------------------------------
# Compressed collectives: payloads through the same torch.distributed calls, channels of a Session.
# Bytes recorded are what this rank sends under a ring / pairwise algorithm.
# ---------------------------------------------------------------------------------------------


def _record(session: Session, key: str, op: str, raw: int, wire: int, full: bool):
    return session.stats.record(key, op, raw, wire, full)


def _check_first(session: Session, key: str, payloads: torch.Tensor, full: bool, group: Group) -> None:
    """Verify the headers of a key's first exchange (one host read per key, not per step)."""
    if full and session.keys[key].exchanges == 1:
        verify_headers(payloads, session, key, group)


def compressed_all_gather(x: torch.Tensor, group: Group, session: Session, key: str, dim: int = 0) -> torch.Tensor:
    """Like :func:`all_gather`; every rank's tensor travels as a compressed residual.

    The local slice of the result is the exact local ``x``.
    """
    size = group_size(group)
    if size == 1:
        return x
    rank = group_rank(group)
    full = session.prepare(key, tuple(x.shape), x.dtype)
    me = global_rank(group, rank)
    payload, _ = session.channel(key, me).encode(x, full)
    gathered = all_gather_bytes(payload, group, session.timeout_s, f"all_gather of {key!r}")
    _check_first(session, key, gathered, full, group)
    parts = [x if j == rank else session.channel(key, global_rank(group, j)).decode(gathered[j], tuple(x.shape), x.dtype, full)
             for j in range(size)]
    ks = _record(session, key, "all_gather", (size - 1) * x.numel() * x.element_size(), (size - 1) * payload.numel(), full)
    out = torch.cat(parts, dim=dim)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, all_gather(x, group, dim))
    maybe_verify(session, key, group)
    return out


def _exchange_chunks(chunks: list[torch.Tensor], group: Group, session: Session, key: str,
                     full: bool) -> tuple[list[torch.Tensor], int]:
    """Send ``chunks[j]`` to rank ``j`` as compressed residuals; return the received chunks
    (own chunk exact) and the payload size."""
    size = group_size(group)
    rank = group_rank(group)
    me = global_rank(group, rank)
    payloads = [None if j == rank else session.channel(key, me, global_rank(group, j)).encode(chunk, full)[0]
                for j, chunk in enumerate(chunks)]
    nbytes = next(p.numel() for p in payloads if p is not None)
    own = payloads[(rank + 1) % size].new_zeros(nbytes)
    send = torch.stack([own if p is None else p for p in payloads])
    recv = all_to_all_bytes(send, group, session.timeout_s, f"all_to_all of {key!r}")
    if full and session.keys[key].exchanges == 1:
        recv_check = torch.cat([recv[:rank], recv[rank + 1:]])
        verify_headers(recv_check, session, key, group, skip_rank=rank)
    shape, dtype = tuple(chunks[0].shape), chunks[0].dtype
    out = [chunks[j] if j == rank else
           session.channel(key, global_rank(group, j), me).decode(recv[j], shape, dtype, full)
           for j in range(size)]
    return out, nbytes


def compressed_all_to_all(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`all_to_all`; each off-rank chunk travels as a compressed residual."""
    size = group_size(group)
    if size == 1:
        return x
    _check_rows(x, size)
    chunks = list(x.chunk(size, dim=0))
    full = session.prepare(key, tuple(chunks[0].shape), x.dtype)
    out, nbytes = _exchange_chunks(chunks, group, session, key, full)
    chunk_bytes = chunks[0].numel() * x.element_size()
    ks = _record(session, key, "all_to_all", (size - 1) * chunk_bytes, (size - 1) * nbytes, full)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, torch.cat(out), all_to_all(x, group))
    maybe_verify(session, key, group)
    return torch.cat(out, dim=0)


def compressed_all_reduce(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Sum over the group in two compressed stages (reduce-scatter as an all-to-all of row chunks,
    then an all-gather of each reduced chunk). Every rank returns the same reconstruction."""
    size = group_size(group)
    if size == 1:
        return x
    rank = group_rank(group)
    shape = tuple(x.shape)
    rows = x.reshape(-1, shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    pad = (-rows.shape[0]) % size
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    chunks = list(rows.chunk(size, dim=0))
    key_rs, key_ag = f"{key}:reduce_scatter", f"{key}:all_gather"
    full = session.prepare(key_rs, tuple(chunks[0].shape), x.dtype)
    received, nbytes_rs = _exchange_chunks(chunks, group, session, key_rs, full)
    reduced = received[0].float() + received[1].float()  # a new buffer: the rest adds in place
    for part in received[2:]:
        reduced.add_(part)
    reduced = reduced.to(x.dtype)
    full_ag = session.prepare(key_ag, tuple(reduced.shape), x.dtype)
    me = global_rank(group, rank)
    payload, own = session.channel(key_ag, me).encode(reduced, full_ag)
    gathered = all_gather_bytes(payload, group, session.timeout_s, f"all_reduce of {key!r}")
    _check_first(session, key_ag, gathered, full_ag, group)
    parts = [own if j == rank else
             session.channel(key_ag, global_rank(group, j)).decode(gathered[j], tuple(reduced.shape), x.dtype, full_ag)
             for j in range(size)]
    out = torch.cat(parts)[: rows.shape[0] - pad].reshape(shape)
    chunk_bytes = chunks[0].numel() * x.element_size()
    ks = _record(session, key, "all_reduce", 2 * (size - 1) * chunk_bytes,
                 (size - 1) * (nbytes_rs + payload.numel()), full)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, all_reduce(x, group))
    maybe_verify(session, key_rs, group)
    maybe_verify(session, key_ag, group)
    return out


def compressed_ring_exchange(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`ring_exchange`; the tensor travels as a compressed residual."""
    size = group_size(group)
    if size == 1:
        return x
    rank = group_rank(group)
    nxt, prv = global_rank(group, (rank + 1) % size), global_rank(group, (rank - 1) % size)
    me = global_rank(group, rank)
    full = session.prepare(key, tuple(x.shape), x.dtype)
    payload, _ = session.channel(key, me, nxt).encode(x, full)
    recv = torch.empty_like(payload)
    ops = [dist.P2POp(dist.isend, payload, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    with transport_timeout(group, session.timeout_s):
        works = dist.batch_isend_irecv(ops)
    for work in works:
        wait(work, session.timeout_s, f"ring_exchange of {key!r}")
    _check_first(session, key, recv.unsqueeze(0), full, group)
    # a copy: the caller may change the result in place, the channel's base must not change with it
    out = session.channel(key, prv, me).decode(recv, tuple(x.shape), x.dtype, full).clone()
    ks = _record(session, key, "ring_exchange", x.numel() * x.element_size(), payload.numel(), full)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, ring_exchange(x, group))
    maybe_verify(session, key, group)
    return out


def maybe_verify(session: Session, key: str, group: Group) -> None:
    """Every ``verify_every`` exchanges of ``key``: gather a checksum of every base of the key from
    every rank; where two copies of a stream differ, every rank schedules a full send of the key."""
    state = session.keys.get(key)
    if (not session.verify_every or state is None or session.mode == "none"
            or state.exchanges % session.verify_every):
        return
    size = group_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    index = {g: i for i, g in enumerate(ranks)}
    device = next((ch.base.device for ch in state.channels.values() if ch.base is not None), torch.device("cpu"))
    table = torch.zeros((size, size + 1, 2), dtype=torch.int64, device=device)
    for (src, dst), channel in state.channels.items():
        if channel.base is not None:
            j = size if dst is None else index[dst]
            table[index[src], j, 0] = channel.checksum()
            table[index[src], j, 1] = 1
    gathered = torch.empty((size, *table.shape), dtype=table.dtype, device=device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with transport_timeout(group, session.timeout_s):
        work = fn(gathered.view(-1), table.view(-1), group=group, async_op=True)
    wait(work, session.timeout_s, f"base verification of {key!r}")
    values, held = gathered[..., 0], gathered[..., 1].bool()
    lo = torch.where(held, values, torch.iinfo(torch.int64).max).amin(0)
    hi = torch.where(held, values, torch.iinfo(torch.int64).min).amax(0)
    mismatch = (held.sum(0) > 1) & (lo != hi)
    if bool(mismatch.any()):
        streams = [f"{ranks[i]}->{'*' if j == size else ranks[j]}" for i, j in mismatch.nonzero().tolist()]
        session.request_resync(key)
        session.stats.warn(f"step {session.step}: bases of {key!r} diverged on streams {', '.join(streams)}; "
                           "resynchronised with a full send")


def verify_headers(payloads: torch.Tensor, session: Session, key: str, group: Group, skip_rank: Optional[int] = None) -> None:
    """Check magic, version and compressor fingerprint of received payloads (``[n, nbytes]``)."""
    headers = payloads.reshape(payloads.shape[0], -1)[:, :HEADER_NBYTES].cpu()  # one host copy for all rows
    for row in headers:
        header = parse_header(row)
        if header.version != WIRE_VERSION or header.fingerprint != session.compressor.fingerprint:
            raise ProtocolError(
                f"ranks disagree on the wire format of {key!r}: this rank uses wire v{WIRE_VERSION} with "
                f"{session.compressor.spec()} (fingerprint {session.compressor.fingerprint:#010x}); a peer sent "
                f"wire v{header.version} with fingerprint {header.fingerprint:#010x}. Give every rank the same "
                "\"compact_hooks\" config and compact-hooks version."
            )


SETTINGS_NBYTES = 1024


def agree_on_settings(session: Session, group: Group, extra: Optional[dict[str, Any]] = None) -> None:
    """Once per group: gather every rank's settings (plus ``extra``, e.g. the hook's compressed
    ops) and raise :class:`ProtocolError` naming both sides when they differ (a different
    compressor, parameter, residual mode or wire version)."""
    size = group_size(group)
    if size == 1:
        return
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(size))
    if ranks in session.checked_groups:
        return
    mine = json.dumps({"wire": WIRE_VERSION, **session.settings(), **(extra or {})}, sort_keys=True).encode()
    if len(mine) > SETTINGS_NBYTES:
        mine = mine[: SETTINGS_NBYTES - 16] + b"...(truncated)"
    device = _device_of(group)
    buf = torch.zeros(SETTINGS_NBYTES, dtype=torch.uint8)
    buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    gathered = all_gather_bytes(buf.to(device), group, session.timeout_s, "the settings handshake").cpu()
    texts = [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in gathered]
    me = group_rank(group)
    for j, text in enumerate(texts):
        if text != texts[me]:
            raise ProtocolError(
                f"ranks of the group {list(ranks)} disagree on compact-hooks settings{_differing(texts[me], text)}: "
                f"rank {ranks[me]} has "
                f"{texts[me]} but rank {ranks[j]} has {text}. Give every rank the same \"compact_hooks\" "
                "config and compact-hooks version."
            )
    session.checked_groups.add(ranks)


def _differing(mine: str, theirs: str) -> str:
    """`` (they differ in: a, b)`` from two settings texts (empty if either is truncated)."""
    try:
        a, b = json.loads(mine), json.loads(theirs)
    except ValueError:
        return ""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f" (they differ in: {', '.join(keys)})" if keys else ""


def _device_of(group: Group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
