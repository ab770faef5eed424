"""LinkAwareHook: compress only the collectives whose group crosses a slow link.

On a cluster, Ulysses all-to-alls inside a host run over NVLink and cost little; the ring exchange
across hosts runs over Ethernet/InfiniBand and dominates. This hook routes each call by the link
class of its group (:meth:`compact_hooks.topology.Topology.link_class`): classes listed in
``compress`` go to the ``compressed`` hook, the others to ``plain`` (typically a PassthroughHook, so
their bytes are untouched and exact). ``stats()["links"]`` counts raw bytes, wire bytes and calls
per link class; the bytes are the routed-to hook's own (read from its ``stats()``).

Before the first hostname exchange of a group, the settings handshake of the CompactHook inside
``compressed`` runs with this hook's ``links`` value, so ranks that route differently raise
:class:`~compact_hooks.errors.ProtocolError` instead of pairing unrelated collectives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .. import collectives as C
from ..collectives.relay import Relay
from ..hook import CollectiveCall, CommHook, WrappingHook
from ..stats import MAX_STEPS
from ..topology import LINK_CLASSES, Topology
from ..work import CollectiveWork, Watch
from .compact import CompactHook


@dataclass
class LinkStats:
    """Totals of one link class (bytes this rank sends, ring / pairwise convention)."""

    raw_bytes: int = 0
    wire_bytes: int = 0
    calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d["compression_ratio"] = self.raw_bytes / self.wire_bytes if self.wire_bytes else None
        return d


def _byte_totals(hook: CommHook) -> Optional[tuple[int, int]]:
    """``(raw_bytes, wire_bytes)`` of ``hook.stats()``, or ``None`` for a hook that counts no bytes."""
    stats = hook.stats()
    raw, wire = stats.get("raw_bytes"), stats.get("wire_bytes")
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (raw, wire))
    return (raw, wire) if ok else None


class _Ledger:
    """Reads one inner hook's byte totals and charges what it sent to one link class at a time.

    ``stats()`` is read when the hook is first used, when it is next called for another link class
    than its pending calls, and at ``settle`` (each step mark and ``stats()``); a hook that counts
    no bytes (``stats()`` without ``raw_bytes``) is charged the plain bytes of each call.
    """

    def __init__(self, hook: CommHook) -> None:
        self.hook = hook
        self.seen: Optional[tuple[int, int]] = None  # the totals at the last read
        self.counts: Optional[bool] = None  # None: not read yet
        self.pending: Optional[str] = None  # the link class of the calls since the last read

    def before(self, link: str) -> Optional[tuple[str, int, int]]:
        """Before a call for ``link``: the bytes to charge to the previous link class, if it differs."""
        if self.counts is None:
            self.seen = _byte_totals(self.hook)
            self.counts = self.seen is not None
        charge = self.settle() if self.pending not in (None, link) else None
        self.pending = link
        return charge

    def settle(self) -> Optional[tuple[str, int, int]]:
        """``(link class, raw, wire)`` the hook sent since the last read (``None``: nothing pending)."""
        link, self.pending = self.pending, None
        if link is None or not self.counts:
            return None
        now = _byte_totals(self.hook)
        if now is None:  # the hook stopped counting bytes
            return None
        last = self.seen or (0, 0)
        if now[0] < last[0] or now[1] < last[1]:  # the hook's own counters were reset meanwhile
            last = (0, 0)
        self.seen = now
        return link, now[0] - last[0], now[1] - last[1]

    def forget(self) -> None:
        """After the hook's ``reset()``: read its totals afresh at its next use."""
        self.seen, self.counts, self.pending = None, None, None


def _settings_owner(hook: CommHook) -> Optional[CompactHook]:
    """The CompactHook inside ``hook`` (through wrappers), whose settings handshake ranks run first."""
    while isinstance(hook, WrappingHook):
        hook = hook.inner
    return hook if isinstance(hook, CompactHook) else None


def links_setting(compress: frozenset[str]) -> str:
    """The ``links`` value of the settings handshake for a set of compressed link classes."""
    if compress == frozenset(LINK_CLASSES):
        return "all"  # what a CompactHook alone does (config links: "all"): compatible on the wire
    return "+".join(c for c in LINK_CLASSES if c in compress) or "none"


class LinkAwareHook(CommHook):
    """Route each call to ``compressed`` or ``plain`` by its group's link class.

    ``topology`` (default: a new :class:`Topology` of this host) exchanges hostnames once per group.
    ``compress`` lists the link classes that are compressed: ``("inter_host",)`` (default) or
    ``("intra_host", "inter_host")`` (every hop). Every rank of a group sees the same hostnames, so
    every rank routes a call the same way. The hostname exchange waits at most ``timeout_s`` (the
    compressed hook's) for a peer. Per-link bytes come from each hook's ``stats()``: a hook
    that serves both link classes (``compress`` of both) has its stats read whenever the class of its
    calls changes, a cost of ``stats()`` per change.
    """

    def __init__(self, compressed: CommHook, plain: CommHook, topology: Optional[Topology] = None,
                 compress: Sequence[str] = ("inter_host",)) -> None:
        unknown = [c for c in compress if c not in LINK_CLASSES]
        if unknown:
            raise ValueError(f"LinkAwareHook compress= takes link classes out of {', '.join(LINK_CLASSES)}; "
                             f"got {', '.join(map(repr, unknown))}")
        if compressed is plain:
            raise ValueError("LinkAwareHook needs two different hooks (compressed and plain); to compress every "
                             "hop use compress=('intra_host', 'inter_host')")
        self.compressed = compressed
        self.plain = plain
        self.topology = topology if topology is not None else Topology()
        self.compress = frozenset(compress)
        self.links = {c: LinkStats() for c in LINK_CLASSES}
        self.step = 0
        self.request = 0
        self._step_links = {c: LinkStats() for c in LINK_CLASSES}
        self.per_step: deque[dict[str, Any]] = deque(maxlen=MAX_STEPS)
        self._ledgers = (_Ledger(compressed), _Ledger(plain))

    @property
    def timeout_s(self) -> Optional[float]:  # type: ignore[override]
        return self.compressed.timeout_s

    def agree(self, group: C.Group) -> None:
        """Once per group: the settings handshake of the CompactHook inside ``compressed`` (if any),
        with this hook's ``links``; ranks that differ raise ProtocolError naming ``links``."""
        owner = _settings_owner(self.compressed)
        if owner is not None:
            extra = {**getattr(owner, "_handshake", {}), "links": links_setting(self.compress)}
            C.agree_on_settings(owner.session, group, extra)

    def route(self, call: CollectiveCall) -> tuple[str, CommHook]:
        """``(link class, hook)`` that ``call`` goes to."""
        link = self.topology.link_class(call.group, self.timeout_s)
        return link, (self.compressed if link in self.compress else self.plain)

    def start(self, call: CollectiveCall) -> CollectiveWork:
        size = C.group_size(call.group)
        if size == 1:
            return CollectiveWork.completed(call.tensor)
        self.agree(call.group)  # before the hostname exchange: a mismatch must not pair the two
        link, hook = self.route(call)
        ledger = self._ledgers[0 if hook is self.compressed else 1]
        self._charge(ledger.before(link))  # a synchronous inner hook counts its bytes in start()
        inner = hook.start(call)

        def finish() -> torch.Tensor:
            # the inner hook counts its bytes when decoded, which is now: what it counted since the
            # last read belongs to the link of the calls before, this call's to ``link``
            self._charge(ledger.before(link))
            out = inner.wait()
            if not ledger.counts:  # a hook without byte counters sends the plain bytes
                raw = C.plain_bytes(call.op, call.tensor.numel() * call.tensor.element_size(), size)
                self._charge((link, raw, raw))
            for table in (self.links, self._step_links):
                table[link].calls += 1
            return out
        return CollectiveWork([Watch(inner)], finish, call.tensor.device)

    def start_relay(self, call: CollectiveCall) -> Relay:
        """The relay ring of the hook the group's link class routes to; each hop's bytes are charged to
        that link class when the hop is decoded."""
        size = C.group_size(call.group)
        if size == 1:
            return Relay(call.group, [])
        self.agree(call.group)
        link, hook = self.route(call)
        ledger = self._ledgers[0 if hook is self.compressed else 1]
        self._charge(ledger.before(link))
        relay = hook.start_relay(call)
        raw = C.plain_bytes("ring_exchange", call.tensor.numel() * call.tensor.element_size(), size)

        def charged(hop: int, inner: CollectiveWork) -> CollectiveWork:
            def finish() -> torch.Tensor:
                self._charge(ledger.before(link))
                out = inner.wait()
                if not ledger.counts:
                    self._charge((link, raw, raw))
                for table in (self.links, self._step_links):
                    table[link].calls += 1
                return out
            return CollectiveWork([Watch(inner)], finish, call.tensor.device)
        return relay.map(charged)

    def outstanding_keys(self) -> list[str]:
        return [*self.compressed.outstanding_keys(), *self.plain.outstanding_keys()]

    def _charge(self, charge: Optional[tuple[str, int, int]]) -> None:
        if charge is not None:
            link, raw, wire = charge
            for table in (self.links, self._step_links):
                table[link].raw_bytes += raw
                table[link].wire_bytes += wire

    def _settle(self) -> None:
        for ledger in self._ledgers:
            self._charge(ledger.settle())

    # -- step and request marks go to both hooks --------------------------------------------------

    def begin_request(self) -> None:
        self.check_idle("begin_request()")
        self.compressed.begin_request()
        self.plain.begin_request()
        self.request += 1
        self.step = 0

    def next_step(self) -> None:
        self.check_idle("next_step()")
        self._settle()
        self.compressed.next_step()
        self.plain.next_step()
        if any(s.calls for s in self._step_links.values()):
            self.per_step.append({"request": self.request, "step": self.step,
                                  "raw_bytes": sum(s.raw_bytes for s in self._step_links.values()),
                                  "wire_bytes": sum(s.wire_bytes for s in self._step_links.values()),
                                  "links": {c: s.as_dict() for c, s in self._step_links.items()}})
        self._step_links = {c: LinkStats() for c in LINK_CLASSES}
        self.step += 1

    def reset(self) -> None:
        self.check_idle("reset()")
        self.compressed.reset()
        self.plain.reset()
        for ledger in self._ledgers:
            ledger.forget()
        self.links = {c: LinkStats() for c in LINK_CLASSES}
        self._step_links = {c: LinkStats() for c in LINK_CLASSES}
        self.per_step.clear()
        self.step = self.request = 0

    def stats(self) -> dict[str, Any]:
        """Totals over both hooks, ``links`` per link class, and each hook's own stats."""
        self._settle()
        raw = sum(s.raw_bytes for s in self.links.values())
        wire = sum(s.wire_bytes for s in self.links.values())
        return {"hook": "link_aware", "compress": sorted(self.compress), "raw_bytes": raw, "wire_bytes": wire,
                "compression_ratio": raw / wire if wire else None,
                "calls": sum(s.calls for s in self.links.values()),
                "links": {c: s.as_dict() for c, s in self.links.items()}, "per_step": list(self.per_step),
                "compressed": self.compressed.stats(), "plain": self.plain.stats()}

    def __repr__(self) -> str:
        return (f"LinkAwareHook(compressed={type(self.compressed).__name__}, plain={type(self.plain).__name__}, "
                f"compress={sorted(self.compress)})")
