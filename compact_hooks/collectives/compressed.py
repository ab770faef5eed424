"""Compressed collectives: codec payloads through the same torch.distributed calls as the plain
ones, reconstructed through the channels of a :class:`~compact_hooks.residual.Session`.

Each collective is staged (``start_compressed_*`` returns a :class:`~compact_hooks.work.CollectiveWork`):
**encode** at start (``Session.prepare``, every stream's residual encoded, sender bases updated),
**wire** in flight (async torch.distributed ops under the session's ``timeout_s``), **decode** at
``wait()`` (headers of a key's first full send verified, receiver bases updated, stats recorded, the
error sample and ``maybe_verify``). ``compressed_*`` is ``start_compressed_*(...).wait()``. A stream's
base thus changes only in its own call's stages, in call order; the decode runs on the caller's thread
(see :mod:`compact_hooks.work`). all_reduce's second stage (the all-gather of the reduced chunks, which
needs the first stage's decode) runs at ``wait()``.

Bytes recorded per call are what this rank sends under a ring / pairwise algorithm: ``raw`` is
always :func:`~compact_hooks.collectives.plain.plain_bytes` of the op and tensor (what the plain
collective would send), ``wire`` the payload bytes really sent. When the steady-state payloads
of a call would not be smaller than the plain collective (tiny tensors, where headers and scales
dominate), the call takes the plain collective instead: compression never sends more than plain.

Codecs whose payload length varies per call (``variable_size``, e.g. ``auto`` with a threshold) exchange
lengths first (8 bytes per payload, counted in ``wire``) and then send exactly the payload bytes; the
length exchange blocks inside start (only the payload transfer is in flight). ``auto`` with a byte
budget (``Session.budget``, :mod:`compact_hooks.budget`) needs no lengths: every rank derives every
stream's level, hence its size, from the previous step's norms, so each stage is one exchange of
known sizes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..budget import Exchange
from ..residual import Channel, Session
from ..stats import KeyStats
from ..wire import HEADER_NBYTES
from ..work import CollectiveWork
from .plain import all_gather, all_reduce, all_to_all, check_rows, global_rank, group_rank, group_size, plain_bytes, start_plain
from .plain import ring_exchange as plain_ring_exchange
from .protocol import maybe_verify, verify_headers
from .transport import (
    SIZE_NBYTES,
    Group,
    Transfer,
    group_ranks,
    start_all_gather_bytes,
    start_all_gather_sized,
    start_all_gather_varlen,
    start_all_to_all_bytes,
    start_all_to_all_sized,
    start_all_to_all_varlen,
    start_exchange_ring,
    start_exchange_ring_varlen,
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


def start_plain_recorded(session: Session, key: str, op: str, x: torch.Tensor, group: Group,
                         dim: int = 0) -> CollectiveWork:
    """Start the plain collective of ``op`` (waiting at most the session's ``timeout_s``), recorded at
    ``wait()`` in the session's stats with raw = wire = its :func:`plain_bytes`."""
    sent = plain_bytes(op, _nbytes(x), group_size(group))
    inner = start_plain(op, x, group, dim, session.timeout_s)

    def finish() -> torch.Tensor:
        out = inner.wait()
        session.stats.record(key, op, sent, sent, False, group_ranks(group), plain=True)
        return out
    return CollectiveWork([inner], finish, x.device)


def plain_recorded(session: Session, key: str, op: str, x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """:func:`start_plain_recorded`, waited."""
    return start_plain_recorded(session, key, op, x, group, dim).wait()


def _check_and_verify(session: Session, ks: KeyStats, out: torch.Tensor, exact: Callable[[], torch.Tensor],
                      group: Group, streams: list[str]) -> None:
    """The decode's bookkeeping: an error sample every ``error_every`` calls (a plain collective
    for the exact result), then the periodic base checksums of each stream."""
    if session.stats.wants_error(ks):
        session.stats.record_error(ks, out, exact())
    for stream in streams:
        maybe_verify(session, stream, group)


def _budget(session: Session, stream: str, shape: tuple[int, ...], dtype: torch.dtype, full: bool,
            sends: list[tuple[int, Optional[int]]], receives: list[tuple[int, Optional[int]]]) -> Optional[Exchange]:
    """``auto`` with a byte budget: this call's levels and sizes, known to every rank (``None``: no budget)."""
    if session.budget is None:
        return None
    return session.budget.exchange(session.request, session.step, stream, shape, dtype, full, sends, receives)


def _encode(channel: Channel, x: torch.Tensor, full: bool, level: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` through ``channel`` (at ``level``, the budget's, when given): payload, own reconstruction."""
    if level is not None:
        channel.codec_state["level"] = level
    return channel.encode(x, full)


def _encode_stream(session: Session, stream: str, x: torch.Tensor, full: bool, src: int, dst: Optional[int],
                   receives: list[tuple[int, Optional[int]]]) -> tuple[torch.Tensor, torch.Tensor, Optional[Exchange]]:
    """Encode this rank's one stream ``src -> dst`` of a stage (at its budgeted level): payload, own reconstruction."""
    ex = _budget(session, stream, tuple(x.shape), x.dtype, full, [(src, dst)], receives)
    payload, own = _encode(session.channel(stream, src, dst), x, full,
                           ex.send_levels[0] if ex is not None and not full else None)
    if ex is not None:
        ex.sent([payload])
    return payload, own, ex


def _encode_gathered(session: Session, stream: str, group: Group, x: torch.Tensor,
                     full: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[Exchange]]:
    """Encode this rank's stream of an all-gather stage (at its budgeted level): payload, own reconstruction."""
    size, rank = group_size(group), group_rank(group)
    return _encode_stream(session, stream, x, full, global_rank(group, rank), None,
                          [(global_rank(group, j), None) for j in range(size) if j != rank])


class _GatherStage:
    """The all-gather stage of one stream per source: every rank's payload in flight; ``received()``
    (after the transfer) checks the headers of a key's first full send."""

    def __init__(self, payload: torch.Tensor, full: bool, session: Session, stream: str, group: Group,
                 dtype: torch.dtype, numel: int, what: str, budget: Optional[Exchange] = None) -> None:
        self.full, self.session, self.stream, self.group, self.dtype, self.numel = full, session, stream, group, dtype, numel
        self.varlen = session.compressor.variable_size and not full
        self.budget = budget
        self.transfer: Transfer
        if budget is not None and not full:  # sizes every rank knows: one exchange
            rank = group_rank(group)
            sizes = iter(budget.receive_nbytes(payload.numel()))
            counts = [payload.numel() if j == rank else next(sizes) for j in range(group_size(group))]
            self.transfer, self.gathered = start_all_gather_sized(payload, counts, group, session.timeout_s, what)
            self.sent = payload.numel()
        elif self.varlen:
            self.transfer, self.gathered = start_all_gather_varlen(payload, group, session.timeout_s, what)
            self.sent = payload.numel() + SIZE_NBYTES  # per peer
        else:
            self.transfer, gathered = start_all_gather_bytes(payload, group, session.timeout_s, what)
            self.gathered, self.sent, self._rows = list(gathered), payload.numel(), gathered

    def received(self) -> list[torch.Tensor]:
        self.transfer.wait()
        if self.full:
            verify_headers(self._rows, self.session, self.stream, self.group, self.dtype, self.numel)
        if self.budget is not None:
            rank = group_rank(self.group)
            self.budget.received([p for j, p in enumerate(self.gathered) if j != rank])
        return self.gathered


def _plan_levels(session: Session, key: str, me: int, streams: list[tuple[int, torch.Tensor]]) -> None:
    """A codec that sizes each call (``auto``): the sizes of all ``(destination, chunk)`` streams of
    one exchange, chosen with one host read before their encodes (each would read its own)."""
    if session.mode not in ("ef", "ef2"):
        return
    channels = [session.channel(key, me, dst) for dst, _ in streams]
    session.compressor.plan([ch.codec_state for ch in channels],
                            [ch.residual(chunk) for ch, (_, chunk) in zip(channels, streams)],
                            [chunk for _, chunk in streams])


class _ChunkStage:
    """The all-to-all stage of compressed residuals: ``chunks[j]`` for rank ``j`` encoded and in
    flight at construction; ``received()`` (after the transfer) checks headers and decodes."""

    def __init__(self, chunks: list[torch.Tensor], group: Group, session: Session, stream: str, full: bool) -> None:
        size = group_size(group)
        self.rank, self.me = group_rank(group), global_rank(group, group_rank(group))
        self.chunks, self.group, self.session, self.stream, self.full = chunks, group, session, stream, full
        self.varlen = session.compressor.variable_size and not full
        rank, me = self.rank, self.me
        if self.varlen:
            _plan_levels(session, stream, me, [(global_rank(group, j), c) for j, c in enumerate(chunks) if j != rank])
        peers = [global_rank(group, j) for j in range(size) if j != rank]
        self.budget = _budget(session, stream, tuple(chunks[0].shape), chunks[0].dtype, full,
                              [(me, g) for g in peers], [(g, me) for g in peers])
        levels = iter(self.budget.send_levels if self.budget is not None and not full else ())
        payloads = [None if j == rank else
                    _encode(session.channel(stream, me, global_rank(group, j)), chunk, full, next(levels, None))[0]
                    for j, chunk in enumerate(chunks)]
        what = f"all_to_all of {stream!r}"
        self.transfer: Transfer
        if self.budget is not None:
            self.budget.sent([p for p in payloads if p is not None])
        if self.budget is not None and not full:  # sizes every rank knows: one exchange
            sizes = iter(self.budget.receive_nbytes(0))
            counts = [0 if j == rank else next(sizes) for j in range(size)]
            self.transfer, self.recv = start_all_to_all_sized(payloads, counts, group, session.timeout_s, what)
            self.sent = sum(p.numel() for p in payloads if p is not None)
        elif self.varlen:
            self.transfer, self.recv = start_all_to_all_varlen(payloads, group, session.timeout_s, what)
            self.sent = sum(p.numel() + SIZE_NBYTES for p in payloads if p is not None)
        else:
            nbytes = next(p.numel() for p in payloads if p is not None)
            own = payloads[(rank + 1) % size].new_zeros(nbytes)
            self.transfer, self.rows = start_all_to_all_bytes(torch.stack([own if p is None else p for p in payloads]),
                                                              group, session.timeout_s, what)
            self.recv = list(self.rows)
            self.sent = (size - 1) * nbytes

    def received(self) -> list[torch.Tensor]:
        """The received chunks (own chunk exact), decoded through the receivers' channels."""
        self.transfer.wait()
        session, chunks, rank = self.session, self.chunks, self.rank
        shape, dtype = tuple(chunks[0].shape), chunks[0].dtype
        if self.full:
            others = torch.cat([self.rows[:rank, :HEADER_NBYTES], self.rows[rank + 1:, :HEADER_NBYTES]])  # the headers
            verify_headers(others, session, self.stream, self.group, dtype, chunks[0].numel())
        if self.budget is not None:
            self.budget.received([p for j, p in enumerate(self.recv) if j != rank])
        return [chunks[j] if j == rank else
                session.channel(self.stream, global_rank(self.group, j), self.me).decode(self.recv[j], shape, dtype,
                                                                                         self.full)
                for j in range(len(chunks))]


def start_compressed_all_gather(x: torch.Tensor, group: Group, session: Session, key: str,
                                dim: int = 0) -> CollectiveWork:
    """Start :func:`compressed_all_gather`: encode now, gather in the background, decode at ``wait()``."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(x)
    if plain_is_cheaper(session, "all_gather", x, size):
        return start_plain_recorded(session, key, "all_gather", x, group, dim)
    shape = tuple(x.shape)
    rank = group_rank(group)
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, shape, x.dtype)
    payload, _, ex = _encode_gathered(session, stream, group, x, full)
    stage = _GatherStage(payload, full, session, stream, group, x.dtype, x.numel(), f"all_gather of {stream!r}", ex)

    def finish() -> torch.Tensor:
        gathered = stage.received()
        parts = [x if j == rank else
                 session.channel(stream, global_rank(group, j)).decode(gathered[j], shape, x.dtype, full)
                 for j in range(size)]
        ks = session.stats.record(key, "all_gather", plain_bytes("all_gather", _nbytes(x), size),
                                  (size - 1) * stage.sent, full, ranks)
        out = torch.cat(parts, dim=dim)
        _check_and_verify(session, ks, out, lambda: all_gather(x, group, dim, session.timeout_s), group, [stream])
        return out
    return CollectiveWork([stage.transfer], finish, x.device)


def compressed_all_gather(x: torch.Tensor, group: Group, session: Session, key: str, dim: int = 0) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.all_gather`; every rank's tensor travels as a
    compressed residual. The local slice of the result is the exact local ``x``."""
    return start_compressed_all_gather(x, group, session, key, dim).wait()


def start_compressed_all_to_all(x: torch.Tensor, group: Group, session: Session, key: str) -> CollectiveWork:
    """Start :func:`compressed_all_to_all`: encode now, exchange in the background, decode at ``wait()``."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(x)
    check_rows(x, size)
    if plain_is_cheaper(session, "all_to_all", x, size):
        return start_plain_recorded(session, key, "all_to_all", x, group)
    chunks = list(x.chunk(size, dim=0))
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, tuple(chunks[0].shape), x.dtype)
    stage = _ChunkStage(chunks, group, session, stream, full)

    def finish() -> torch.Tensor:
        out = torch.cat(stage.received(), dim=0)
        ks = session.stats.record(key, "all_to_all", plain_bytes("all_to_all", _nbytes(x), size), stage.sent, full,
                                  ranks)
        _check_and_verify(session, ks, out, lambda: all_to_all(x, group, session.timeout_s), group, [stream])
        return out
    return CollectiveWork([stage.transfer], finish, x.device)


def compressed_all_to_all(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.all_to_all`; each off-rank chunk travels as a
    compressed residual."""
    return start_compressed_all_to_all(x, group, session, key).wait()


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


def start_compressed_all_reduce(x: torch.Tensor, group: Group, session: Session, key: str) -> CollectiveWork:
    """Start :func:`compressed_all_reduce`: the reduce-scatter stage is encoded and in flight; its
    decode, the sum and the all-gather stage run at ``wait()``."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(x)
    if plain_is_cheaper(session, "all_reduce", x, size):
        return start_plain_recorded(session, key, "all_reduce", x, group)
    chunks = reduce_chunks(x, size)
    chunk_shape = tuple(chunks[0].shape)
    rank = group_rank(group)
    ranks = group_ranks(group)  # the key's streams on this group:
    key_rs, key_ag = session.stream(f"{key}:reduce_scatter", ranks), session.stream(f"{key}:all_gather", ranks)
    full = session.prepare(key_rs, chunk_shape, x.dtype)
    stage_rs = _ChunkStage(chunks, group, session, key_rs, full)

    def finish() -> torch.Tensor:
        received = stage_rs.received()
        reduced = received[0].float() + received[1].float()  # a new buffer: the rest adds in place
        for part in received[2:]:
            reduced.add_(part)
        reduced = reduced.to(x.dtype)
        full_ag = session.prepare(key_ag, chunk_shape, x.dtype)
        payload, own, ex = _encode_gathered(session, key_ag, group, reduced, full_ag)
        stage_ag = _GatherStage(payload, full_ag, session, key_ag, group, x.dtype, reduced.numel(),
                                f"all_reduce of {key!r}", ex)
        gathered = stage_ag.received()
        parts = [own if j == rank else
                 session.channel(key_ag, global_rank(group, j)).decode(gathered[j], chunk_shape, x.dtype, full_ag)
                 for j in range(size)]
        out = torch.cat(parts).reshape(-1)[: x.numel()].reshape(x.shape)
        ks = session.stats.record(key, "all_reduce", plain_bytes("all_reduce", _nbytes(x), size),
                                  stage_rs.sent + (size - 1) * stage_ag.sent, full or full_ag, ranks)
        _check_and_verify(session, ks, out, lambda: all_reduce(x, group, session.timeout_s), group, [key_rs, key_ag])
        return out
    return CollectiveWork([stage_rs.transfer], finish, x.device)


def compressed_all_reduce(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Sum over the group in two compressed stages (reduce-scatter as an all-to-all of chunks, then
    an all-gather of each reduced chunk). Every rank returns the same reconstruction."""
    return start_compressed_all_reduce(x, group, session, key).wait()


def start_compressed_ring_exchange(x: torch.Tensor, group: Group, session: Session, key: str) -> CollectiveWork:
    """Start :func:`compressed_ring_exchange`: encode now, send and receive in the background, decode at ``wait()``."""
    size = group_size(group)
    if size == 1:
        return CollectiveWork.completed(x)
    if plain_is_cheaper(session, "ring_exchange", x, size):
        return start_plain_recorded(session, key, "ring_exchange", x, group)
    shape = tuple(x.shape)
    rank = group_rank(group)
    nxt, prv = global_rank(group, (rank + 1) % size), global_rank(group, (rank - 1) % size)
    me = global_rank(group, rank)
    ranks = group_ranks(group)
    stream = session.stream(key, ranks)  # the key's streams on this group
    full = session.prepare(stream, shape, x.dtype)
    payload, _, ex = _encode_stream(session, stream, x, full, me, nxt, [(prv, me)])
    what, sent = f"ring_exchange of {stream!r}", payload.numel()
    varlen = session.compressor.variable_size and not full
    recv: Optional[torch.Tensor] = None
    if ex is not None and not full:  # the size every rank knows: one exchange
        recv = payload.new_empty(ex.receive_nbytes(0)[0])
        transfer = start_exchange_ring(payload, recv, nxt, prv, group, session.timeout_s, what)
    elif varlen:
        transfer, recv = start_exchange_ring_varlen(payload, nxt, prv, group, session.timeout_s, what)
        sent += SIZE_NBYTES
    else:
        recv = torch.empty_like(payload)
        transfer = start_exchange_ring(payload, recv, nxt, prv, group, session.timeout_s, what)

    def finish() -> torch.Tensor:
        if full and not varlen:
            verify_headers(recv.unsqueeze(0), session, stream, group, x.dtype, x.numel())
        if ex is not None:
            ex.received([recv])
        # a copy: the caller may change the result in place, the channel's base must not change with it
        out = session.channel(stream, prv, me).decode(recv, shape, x.dtype, full).clone()
        ks = session.stats.record(key, "ring_exchange", plain_bytes("ring_exchange", _nbytes(x), size), sent, full,
                                  ranks)
        _check_and_verify(session, ks, out, lambda: plain_ring_exchange(x, group, session.timeout_s), group, [stream])
        return out
    return CollectiveWork([transfer], finish, x.device)


def compressed_ring_exchange(x: torch.Tensor, group: Group, session: Session, key: str) -> torch.Tensor:
    """Like :func:`~compact_hooks.collectives.plain.ring_exchange`; the tensor travels as a
    compressed residual."""
    return start_compressed_ring_exchange(x, group, session, key).wait()
