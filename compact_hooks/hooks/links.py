"""LinkAwareHook: compress only the collectives whose group crosses a slow link.

On a cluster, Ulysses all-to-alls inside a host run over NVLink and cost little; the ring exchange
across hosts runs over Ethernet/InfiniBand and dominates. This hook routes each call by the link
class of its group (:meth:`compact_hooks.topology.Topology.link_class`): classes listed in
``compress`` go to the ``compressed`` hook, the others to ``plain`` (typically a PassthroughHook, so
their bytes are untouched and exact). ``stats()["links"]`` counts raw bytes, wire bytes and calls
per link class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .. import collectives as C
from ..hook import CollectiveCall, CommHook
from ..stats import MAX_STEPS
from ..topology import LINK_CLASSES, Topology


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


def _wire_counter(hook: CommHook) -> Optional[int]:
    """The running wire-byte count of a hook with a residual session (CompactHook), else ``None``."""
    stats = getattr(getattr(hook, "session", None), "stats", None)
    value = getattr(stats, "step_wire", None)
    return value if isinstance(value, int) else None


class LinkAwareHook(CommHook):
    """Route each call to ``compressed`` or ``plain`` by its group's link class.

    ``topology`` (default: a new :class:`Topology` of this host) exchanges hostnames once per group.
    ``compress`` lists the link classes that are compressed: ``("inter_host",)`` (default) or
    ``("intra_host", "inter_host")`` (every hop). Every rank of a group sees the same hostnames, so
    every rank routes a call the same way.
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

    @property
    def timeout_s(self) -> Optional[float]:  # type: ignore[override]
        return self.compressed.timeout_s

    def route(self, call: CollectiveCall) -> tuple[str, CommHook]:
        """``(link class, hook)`` that ``call`` goes to."""
        link = self.topology.link_class(call.group)
        return link, (self.compressed if link in self.compress else self.plain)

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        size = C.group_size(call.group)
        if size == 1:
            return call.tensor
        link, hook = self.route(call)
        raw = C.plain_bytes(call.op, call.tensor.numel() * call.tensor.element_size(), size)
        before = _wire_counter(hook)
        out = hook(call)
        after = _wire_counter(hook)
        wire = raw if before is None or after is None else after - before
        for table in (self.links, self._step_links):
            s = table[link]
            s.raw_bytes += raw
            s.wire_bytes += wire
            s.calls += 1
        return out

    # -- step and request marks go to both hooks --------------------------------------------------

    def begin_request(self) -> None:
        self.compressed.begin_request()
        self.plain.begin_request()
        self.request += 1
        self.step = 0

    def next_step(self) -> None:
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
        self.compressed.reset()
        self.plain.reset()
        self.links = {c: LinkStats() for c in LINK_CLASSES}
        self._step_links = {c: LinkStats() for c in LINK_CLASSES}
        self.per_step.clear()
        self.step = self.request = 0

    def stats(self) -> dict[str, Any]:
        """Totals over both hooks, ``links`` per link class, and each hook's own stats."""
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
