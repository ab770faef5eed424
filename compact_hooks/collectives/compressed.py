"""Compressed collectives: codec payloads through the same torch.distributed calls as the plain
ones, reconstructed through the channels of a :class:`~compact_hooks.residual.Session`.

Bytes recorded per call are what this rank sends under a ring / pairwise algorithm: ``raw`` is
always :func:`~compact_hooks.collectives.plain.plain_bytes` of the op and tensor (what the plain
collective would send), ``wire`` the payload bytes really sent. When the steady-state payloads
of a call would not be smaller than the plain collective (tiny tensors, where headers and scales
dominate), the call takes the plain collective instead: compression never sends more than plain.

Codecs whose payload length varies per call (``variable_size``, e.g. ``auto``) exchange lengths
first (8 bytes per payload, counted in ``wire``) and then send exactly the payload bytes.
"""

from __future__ import annotations

import torch

from ..residual import Session
from .plain import all_gather, all_reduce, all_to_all, check_rows, global_rank, group_rank, group_size, plain_bytes
from .plain import ring_exchange as plain_ring_exchange
from .protocol import maybe_verify, verify_headers
from .transport import (
    SIZE_NBYTES,
    Group,
    all_gather_bytes,
    all_gather_varlen,
    all_to_all_bytes,
    all_to_all_varlen,
    exchange_ring,
    exchange_ring_varlen,
    group_ranks,
)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def plain_is_cheaper(session: Session, op: str, x: torch.Tensor, size: int) -> bool:
    """Whether the plain collective sends no more than the compressed one would in a steady step
    (tiny tensors, where headers and scales dominate; a summable cast no narrower than ``x``). A
    variable-size codec's largest payload counts with the length sent before it."""
    compressor = session.compressor
    if op == "all_reduce" and compressor.summable:
        wire = torch.empty((), dtype=getattr(compressor, "wire_dtype", x.dtype)).element_size()
        return wire >= x.element_size()
    length = SIZE_NBYTES if compressor.variable_size else 0
    if op == "all_reduce":
        chunk = tuple(reduce_chunks(x, size)[0].shape)
        payload = session.payload_nbytes(chunk, x.dtype, False) + length
        return 2 * (size - 1) * payload >= plain_bytes(op, _nbytes(x), size)
    piece = (x.shape[0] // size, *x.shape[1:]) if op == "all_to_all" else tuple(x.shape)
    payload = session.payload_nbytes(piece, x.dtype, False) + length
    return payload >= _nbytes(x) // (size if op == "all_to_all" else 1)


def plain_recorded(session: Session, key: str, op: str, x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """The plain collective of ``op`` (waiting at most the session's ``timeout_s``), recorded in the
    session's stats with raw = wire = its :func:`plain_bytes`."""
    sent = plain_bytes(op, _nbytes(x), group_size(group))
    session.stats.record(key, op, sent, sent, False, group_ranks(group), plain=True)
    timeout = session.timeout_s
    if op == "all_gather":
        return all_gather(x, group, dim, timeout)
    if op == "all_to_all":
        return all_to_all(x, group, timeout)
    if op == "all_reduce":
        return all_reduce(x, group, timeout)
    return plain_ring_exchange(x, group, timeout)


def _gather_payloads(payload: torch.Tensor, full: bool, session: Session, key: str, group: Group,
                     dtype: torch.dtype, numel: int, what: str) -> tuple[list[torch.Tensor], int]:
    """Every rank's payload of an all-gather stage and the bytes this rank sent per peer (a length
    first for variable-size codecs); the headers of a key's first full send are verified."""
    if session.compressor.variable_size and not full:
        return all_gather_varlen(payload, group, session.timeout_s, what), payload.numel() + SIZE_NBYTES
    gathered = all_gather_bytes(payload, group, session.timeout_s, what)
    if full:
        verify_headers(gathered, session, key, group, dtype, numel)
    return list(gathered), payload.numel()


def compressed_all_gather(x: torch.Tensor, group: Group, session: Session, key: str, dim: int = 0) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.all_gather`; every rank's tensor travels as a
    compressed residual. The local slice of the result is the exact local ``x``."""
    size = group_size(group)
    if size == 1:
        return x
    if plain_is_cheaper(session, "all_gather", x, size):
        return plain_recorded(session, key, "all_gather", x, group, dim)
    shape = tuple(x.shape)
    rank = group_rank(group)
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, shape, x.dtype)
    payload, _ = session.channel(stream, global_rank(group, rank)).encode(x, full)
    gathered, sent = _gather_payloads(payload, full, session, stream, group, x.dtype, x.numel(),
                                      f"all_gather of {stream!r}")
    parts = [x if j == rank else
             session.channel(stream, global_rank(group, j)).decode(gathered[j], shape, x.dtype, full)
             for j in range(size)]
    ks = session.stats.record(key, "all_gather", plain_bytes("all_gather", _nbytes(x), size), (size - 1) * sent, full,
                              ranks)
    out = torch.cat(parts, dim=dim)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, all_gather(x, group, dim, session.timeout_s))
    maybe_verify(session, stream, group)
    return out


def _plan_levels(session: Session, key: str, me: int, streams: list[tuple[int, torch.Tensor]]) -> None:
    """A codec that sizes each call (``auto``): the sizes of all ``(destination, chunk)`` streams of
    one exchange, chosen with one host read before their encodes (each would read its own)."""
    if session.mode not in ("ef", "ef2"):
        return
    channels = [session.channel(key, me, dst) for dst, _ in streams]
    session.compressor.plan([ch.codec_state for ch in channels],
                            [ch.residual(chunk) for ch, (_, chunk) in zip(channels, streams)],
                            [chunk for _, chunk in streams])


def _exchange_chunks(chunks: list[torch.Tensor], group: Group, session: Session, key: str,
                     full: bool) -> tuple[list[torch.Tensor], int]:
    """Send ``chunks[j]`` to rank ``j`` as compressed residuals; return the received chunks
    (own chunk exact) and the bytes this rank sent."""
    size = group_size(group)
    rank = group_rank(group)
    me = global_rank(group, rank)
    if session.compressor.variable_size and not full:
        _plan_levels(session, key, me, [(global_rank(group, j), c) for j, c in enumerate(chunks) if j != rank])
    payloads = [None if j == rank else session.channel(key, me, global_rank(group, j)).encode(chunk, full)[0]
                for j, chunk in enumerate(chunks)]
    shape, dtype = tuple(chunks[0].shape), chunks[0].dtype
    what = f"all_to_all of {key!r}"
    if session.compressor.variable_size and not full:
        recv = all_to_all_varlen(payloads, group, session.timeout_s, what)
        sent = sum(p.numel() + SIZE_NBYTES for p in payloads if p is not None)
    else:
        nbytes = next(p.numel() for p in payloads if p is not None)
        own = payloads[(rank + 1) % size].new_zeros(nbytes)
        recv = all_to_all_bytes(torch.stack([own if p is None else p for p in payloads]), group, session.timeout_s, what)
        sent = (size - 1) * nbytes
        if full:
            others = torch.cat([recv[:rank], recv[rank + 1:]])
            verify_headers(others, session, key, group, dtype, chunks[0].numel())
    out = [chunks[j] if j == rank else
           session.channel(key, global_rank(group, j), me).decode(recv[j], shape, dtype, full)
           for j in range(size)]
    return out, sent


def compressed_all_to_all(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.all_to_all`; each off-rank chunk travels as a
    compressed residual."""
    size = group_size(group)
    if size == 1:
        return x
    check_rows(x, size)
    if plain_is_cheaper(session, "all_to_all", x, size):
        return plain_recorded(session, key, "all_to_all", x, group)
    chunks = list(x.chunk(size, dim=0))
    chunk_shape = tuple(chunks[0].shape)
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, chunk_shape, x.dtype)
    out, sent = _exchange_chunks(chunks, group, session, stream, full)
    ks = session.stats.record(key, "all_to_all", plain_bytes("all_to_all", _nbytes(x), size), sent, full, ranks)
    result = torch.cat(out, dim=0)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, result, all_to_all(x, group, session.timeout_s))
    maybe_verify(session, stream, group)
    return result


def reduce_chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``x`` cut into ``size`` equal 2-D chunks for the two-stage all_reduce.

    Rows of the ``[T, C]`` view when they split evenly (or nearly: ``T >= 8 * size``, zero rows
    padded at the end); otherwise the flat elements, as ``size`` chunks of ``[1, ceil(n / size)]``
    (a ``[1, C]`` or 1-D tensor is not put on one rank with zeros everywhere else). Concatenating
    the chunks and taking the first ``x.numel()`` elements in row-major order gives ``x`` back.
    """
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    t = rows.shape[0]
    if t % size == 0 or t >= 8 * size:
        pad = (-t) % size
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        return list(rows.chunk(size, dim=0))
    flat = x.reshape(-1)
    per = -(-flat.numel() // size)
    pad = per * size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return list(flat.view(size, 1, per).unbind(0))


def compressed_all_reduce(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Sum over the group in two compressed stages (reduce-scatter as an all-to-all of chunks, then
    an all-gather of each reduced chunk). Every rank returns the same reconstruction."""
    size = group_size(group)
    if size == 1:
        return x
    if plain_is_cheaper(session, "all_reduce", x, size):
        return plain_recorded(session, key, "all_reduce", x, group)
    chunks = reduce_chunks(x, size)
    chunk_shape = tuple(chunks[0].shape)
    rank = group_rank(group)
    ranks = group_ranks(group)  # the key's streams on this group:
    key_rs, key_ag = session.stream(f"{key}:reduce_scatter", ranks), session.stream(f"{key}:all_gather", ranks)
    full = session.prepare(key_rs, chunk_shape, x.dtype)
    received, sent_rs = _exchange_chunks(chunks, group, session, key_rs, full)
    reduced = received[0].float() + received[1].float()  # a new buffer: the rest adds in place
    for part in received[2:]:
        reduced.add_(part)
    reduced = reduced.to(x.dtype)
    full_ag = session.prepare(key_ag, chunk_shape, x.dtype)
    me = global_rank(group, rank)
    payload, own = session.channel(key_ag, me).encode(reduced, full_ag)
    gathered, sent_ag = _gather_payloads(payload, full_ag, session, key_ag, group, x.dtype, reduced.numel(),
                                         f"all_reduce of {key!r}")
    parts = [own if j == rank else
             session.channel(key_ag, global_rank(group, j)).decode(gathered[j], chunk_shape, x.dtype, full_ag)
             for j in range(size)]
    out = torch.cat(parts).reshape(-1)[: x.numel()].reshape(x.shape)
    ks = session.stats.record(key, "all_reduce", plain_bytes("all_reduce", _nbytes(x), size),
                              sent_rs + (size - 1) * sent_ag, full or full_ag, ranks)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, all_reduce(x, group, session.timeout_s))
    maybe_verify(session, key_rs, group)
    maybe_verify(session, key_ag, group)
    return out


def compressed_ring_exchange(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.ring_exchange`; the tensor travels as a
    compressed residual."""
    size = group_size(group)
    if size == 1:
        return x
    if plain_is_cheaper(session, "ring_exchange", x, size):
        return plain_recorded(session, key, "ring_exchange", x, group)
    shape = tuple(x.shape)
    rank = group_rank(group)
    nxt, prv = global_rank(group, (rank + 1) % size), global_rank(group, (rank - 1) % size)
    me = global_rank(group, rank)
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, shape, x.dtype)
    payload, _ = session.channel(stream, me, nxt).encode(x, full)
    what, sent = f"ring_exchange of {stream!r}", payload.numel()
    if session.compressor.variable_size and not full:
        recv = exchange_ring_varlen(payload, nxt, prv, group, session.timeout_s, what)
        sent += SIZE_NBYTES
    else:
        recv = torch.empty_like(payload)
        exchange_ring(payload, recv, nxt, prv, group, session.timeout_s, what)
        if full:
            verify_headers(recv.unsqueeze(0), session, stream, group, x.dtype, x.numel())
    # a copy: the caller may change the result in place, the channel's base must not change with it
    out = session.channel(stream, prv, me).decode(recv, shape, x.dtype, full).clone()
    ks = session.stats.record(key, "ring_exchange", plain_bytes("ring_exchange", _nbytes(x), size), sent, full,
                              ranks)
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, plain_ring_exchange(x, group, session.timeout_s))
    maybe_verify(session, stream, group)
    return out
