"""The relay ring: each rank's block travels around the ring once, as the same bytes at every hop.

Ring attention moves every rank's K/V block to every other rank in ``P - 1`` hops: at hop ``h`` rank
``r`` holds the block of group rank ``(r - h) % P``. A per-hop ring exchange re-encodes at every hop
the block it just decoded, so hop ``h`` carries ``h`` lossy streams and the encoder runs ``P - 1``
times. A relay encodes a rank's block once (its owner's stream, ``Session.channel(stream, src)``
with ``dst=None``, as in all_gather); every hop forwards the received payload bytes unchanged, and
every receiver decodes the payload of source ``s`` against its own base of ``s``. So the block of
``s`` is bit-identical on every receiver, whatever the hop, and the error of the last hop equals
the error of the first.

Double buffering: hop 1 is posted at start; hop ``h + 1`` is posted by hop ``h``'s ``wait()`` as soon
as hop ``h``'s bytes arrived (before its decode), so the next transfer is in flight while the caller
computes on block ``h``::

    relay = hook.start_relay(CollectiveCall("ring_exchange", k, group, key="blocks.0.attn:k"))
    ...                                   # attention of the own block: hop 1 in flight
    for work in relay:                    # P - 1 hops
        k_blk = work.wait()               # hop h decoded, hop h + 1 in flight
        ...                               # attention of k_blk

Every hop's work is a :class:`~compact_hooks.work.CollectiveWork`; waiting hop ``h`` waits the
hops before it first. Every rank starts and waits its relays in the same order (as any collective).
The block a plain relay returns is also the next hop's send buffer: read it, don't change it in place
before the next hop's work was waited.

:class:`PerHopRelay` is the relay of a hook without its own: one ring exchange per hop, started when
the hop is waited (keys ``<key>.hop1``, ``.hop2``, ...: today's synchronous per-hop path).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..residual import Session
from ..stats import KeyStats
from ..work import CollectiveWork
from .plain import all_gather, global_rank, group_rank, group_size, plain_bytes
from .protocol import maybe_verify, verify_headers
from .transport import SIZE_NBYTES, Group, Transfer, gather_lengths, group_ranks, start_transfer


def hop_key(key: Optional[str], hop: int) -> Optional[str]:
    """The stats key of one hop of a relay keyed ``key`` (``None`` stays ``None``: an auto key)."""
    return None if key is None else f"{key}.hop{hop}"


class Relay:
    """The ``P - 1`` hop works of one relayed tensor, taken in order with :meth:`next` (or iterated)."""

    def __init__(self, group: Group, works: Sequence[CollectiveWork], full: bool = False) -> None:
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)
        self.works = list(works)
        self.full = full  # a compressed relay's full send (the key's first, or a warm-up step)
        self._taken = 0

    def source(self, hop: int) -> int:
        """The group rank whose block arrives at ``hop`` (hop 0: this rank's own)."""
        return (self.rank - hop) % self.size

    def next(self) -> CollectiveWork:
        """The work of the next hop (its ``wait()`` returns that hop's block)."""
        if self._taken >= len(self.works):
            raise RuntimeError(f"this relay has {len(self.works)} hops and every one was taken")
        self._taken += 1
        return self.works[self._taken - 1]

    def __iter__(self) -> Iterator[CollectiveWork]:
        while self._taken < len(self.works):
            yield self.next()

    def __len__(self) -> int:
        return len(self.works)

    @property
    def last(self) -> Optional[CollectiveWork]:
        """The last hop's work (``None`` on a group of one): decoded means the relay is done."""
        return self.works[-1] if self.works else None

    def map(self, wrap: Callable[[int, CollectiveWork], CollectiveWork]) -> "Relay":
        """A relay of ``wrap(hop, work)`` for every hop (a wrapping hook's bookkeeping)."""
        return Relay(self.group, [wrap(h + 1, w) for h, w in enumerate(self.works)])


class _HopWire:
    """Hop ``h``'s transfer as a wire stage: waiting it first waits hop ``h - 1``, whose ``wait()``
    posts it."""

    def __init__(self, relay: "_Forward", hop: int) -> None:
        self.relay, self.hop = relay, hop

    def is_completed(self) -> bool:
        transfer = self.relay.transfers.get(self.hop)
        return transfer is not None and transfer.is_completed()

    def wait(self) -> None:
        if self.hop not in self.relay.transfers:
            self.relay.works[self.hop - 2].wait()  # posts this hop (or raises what stopped it)
        self.relay.transfers[self.hop].wait()


class _Forward:
    """The wire of a relay: ``parcel`` (tensors) is sent at hop 1, each hop forwards what it received.
    ``buffers(hop)`` gives the receive buffers of a hop, ``decode(hop, received)`` its block."""

    def __init__(self, parcel: list[torch.Tensor], group: Group, timeout_s: Optional[float], what: str,
                 buffers: Callable[[int], list[torch.Tensor]],
                 decode: Callable[[int, list[torch.Tensor]], torch.Tensor], device: torch.device) -> None:
        self.group, self.timeout_s, self.what = group, timeout_s, what
        self.buffers, self.decode = buffers, decode
        size, rank = group_size(group), group_rank(group)
        self.size = size
        self.next_rank = global_rank(group, (rank + 1) % size)
        self.prev_rank = global_rank(group, (rank - 1) % size)
        self.transfers: dict[int, Transfer] = {}
        self.received: dict[int, list[torch.Tensor]] = {}
        self.works = [CollectiveWork([_HopWire(self, h)], (lambda h=h: self._finish(h)), device)
                      for h in range(1, size)]
        if size > 1:
            self._post(1, parcel)

    def _post(self, hop: int, parcel: list[torch.Tensor]) -> None:
        recv = self.buffers(hop)
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in parcel]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in recv]
        self.received[hop] = recv
        self.transfers[hop] = start_transfer(lambda: dist.batch_isend_irecv(ops), self.group, self.timeout_s,
                                             f"{self.what} (hop {hop})")

    def _finish(self, hop: int) -> torch.Tensor:
        received = self.received.pop(hop)
        if hop + 1 < self.size:
            self._post(hop + 1, received)  # forward the bytes before decoding: the next hop moves now
        return self.decode(hop, received)


def start_forward_relay(parcel: list[torch.Tensor], group: Group, timeout_s: Optional[float], what: str,
                        buffers: Callable[[int], list[torch.Tensor]],
                        decode: Callable[[int, list[torch.Tensor]], torch.Tensor],
                        device: Optional[torch.device] = None) -> Relay:
    """A relay of ``parcel`` (contiguous tensors, equal shapes on every rank unless ``buffers`` says
    otherwise): hop 1 is posted now; see :class:`_Forward`."""
    device = device if device is not None else (parcel[0].device if parcel else torch.device("cpu"))
    return Relay(group, _Forward(parcel, group, timeout_s, what, buffers, decode, device).works)


def start_plain_relay(x: torch.Tensor, group: Group, timeout_s: Optional[float] = None,
                      on_hop: Optional[Callable[[int], None]] = None, wire_dtype: Optional[torch.dtype] = None) -> Relay:
    """The uncompressed relay of ``x`` (in ``wire_dtype`` on the wire if given, returned in ``x``'s
    dtype); ``on_hop(hop)`` runs when a hop is decoded (byte counters)."""
    if group_size(group) == 1:
        return Relay(group, [])
    send = x.to(wire_dtype or x.dtype, memory_format=torch.contiguous_format, copy=False).contiguous()

    def decode(hop: int, received: list[torch.Tensor]) -> torch.Tensor:
        if on_hop is not None:
            on_hop(hop)
        return received[0] if received[0].dtype == x.dtype else received[0].to(x.dtype)
    return start_forward_relay([send], group, timeout_s, "relay ring", lambda hop: [torch.empty_like(send)], decode)


def start_compressed_relay(x: torch.Tensor, group: Group, session: Session, key: str) -> Relay:
    """The compressed relay of ``x`` (see the module): encoded once by this rank, forwarded unchanged,
    decoded by every receiver against its base of the source. Stats per hop under ``key.hopN``
    (``ring_exchange``: raw = the plain hop's bytes, wire = the payload forwarded); the error sample
    (``error_every``) compares every hop's block with the exact source block (one plain all-gather);
    ``maybe_verify`` runs at the last hop."""
    size = group_size(group)
    if size == 1:
        return Relay(group, [])
    shape, dtype, nbytes = tuple(x.shape), x.dtype, x.numel() * x.element_size()
    rank, ranks = group_rank(group), group_ranks(group)
    stream = session.stream(key, ranks)
    full = session.prepare(stream, shape, dtype)
    payload, _ = session.channel(stream, global_rank(group, rank)).encode(x, full)
    what = f"relay ring of {stream!r}"
    varlen = session.compressor.variable_size and not full
    lengths = (gather_lengths(payload.numel(), group, session.timeout_s, what, payload.device) if varlen
               else [payload.numel()] * size)
    samples: list[tuple[KeyStats, torch.Tensor, int]] = []

    def buffers(hop: int) -> list[torch.Tensor]:
        return [torch.empty(lengths[(rank - hop) % size], dtype=torch.uint8, device=payload.device)]

    def decode(hop: int, received: list[torch.Tensor]) -> torch.Tensor:
        src = (rank - hop) % size
        recv = received[0]
        if full and hop == 1:
            verify_headers(recv.unsqueeze(0), session, stream, group, dtype, x.numel())
        block = session.channel(stream, global_rank(group, src)).decode(recv, shape, dtype, full)
        sent = lengths[(rank - hop + 1) % size] + (SIZE_NBYTES if varlen and hop == 1 else 0)
        ks = session.stats.record(hop_key(key, hop), "ring_exchange", plain_bytes("ring_exchange", nbytes, size),
                                  sent, full, ranks)
        if session.stats.wants_error(ks):
            samples.append((ks, block, src))
        if hop == size - 1:
            if samples:
                exact = all_gather(x.unsqueeze(0), group, 0, session.timeout_s)
                for sample_ks, got, j in samples:
                    session.stats.record_error(sample_ks, got, exact[j])
            maybe_verify(session, stream, group)
        # a copy: the caller may change the block in place, the receiver's base must not change with it
        return block.clone()
    relay = start_forward_relay([payload], group, session.timeout_s, what, buffers, decode, x.device)
    relay.full = full
    return relay


class _Started:
    """A per-hop relay's hop as a wire stage: completed once its exchange was started and finished."""

    def __init__(self, relay: "PerHopRelay", hop: int) -> None:
        self.relay, self.hop = relay, hop

    def is_completed(self) -> bool:
        work = self.relay.started.get(self.hop)
        return work is not None and work.is_completed()

    def wait(self) -> None:
        """Nothing: the hop's exchange starts (and is waited) in its decode."""


class PerHopRelay(Relay):
    """The relay of a hook without its own: hop ``h`` is a ``ring_exchange`` of hop ``h - 1``'s block
    through ``start(tensor, hop)`` (the hook's ``start``, key ``<key>.hopN``), started when the hop is
    waited and waited at once (exchange, then compute: the per-hop path)."""

    def __init__(self, x: torch.Tensor, group: Group,
                 start: Callable[[torch.Tensor, int], CollectiveWork]) -> None:
        size = group_size(group)
        self.started: dict[int, CollectiveWork] = {}
        self._block = x
        self._start = start
        super().__init__(group, [CollectiveWork([_Started(self, h)], (lambda h=h: self._hop(h)), x.device)
                                 for h in range(1, size)])

    def _hop(self, hop: int) -> torch.Tensor:
        if hop > 1:
            self.works[hop - 2].wait()
        work = self.started[hop] = self._start(self._block, hop)
        self._block = work.wait()
        return self._block
