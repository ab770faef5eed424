"""Plain or compressed, per relay-ring call site: ``"plain_when_faster": true``.

On a fast link an uncompressed hop can take less time than the codec costs (on CPU an int2 encode
and ``P - 1`` decodes of a K/V block take longer than 1 Gbit/s moves its bytes), and then
compressing makes the run slower. With ``plain_when_faster`` a :class:`~compact_hooks.hooks.CompactHook`
measures and decides, once per relay call site (key and group), for the rest of its life:

1. the site's first compressed (not full) relay runs as usual while a :class:`CodecClock` times this
   rank's encode and decodes (CUDA synchronized around each, on that one step only);
2. at the site's next relay, every rank of the group estimates both ways: the link's seconds per
   byte from one timed ring hop of :data:`PROBE_NBYTES` (once per group), times the ``P - 1`` hops of
   the plain block, against the codec seconds plus the hops of the payload. The ranks all-gather
   their estimates and sum them in rank order, so every rank takes the same choice: plain when the
   plain sum is not larger.

A plain site sends the plain relay (exact, counted as plain) from then on; its residual bases are
no longer used. The rule counts transfers as if nothing hid them: where a plain hop would hide
entirely behind the attention of a block, plain may win by more than the rule credits it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .plain import all_gather, global_rank, group_rank, group_size
from .transport import Group, group_ranks, start_exchange_ring

PROBE_NBYTES = 256 * 1024  # one timed ring hop per group: 0.1 s at 20 Mbit/s, 2 ms at 1 Gbit/s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CodecClock:
    """Seconds one rank spent in one relay's encode and decodes, and whether that relay was full."""

    seconds: float = 0.0
    payload_nbytes: int = 0
    full: bool = False
    hops: int = 0  # decodes timed (the relay's P - 1 when it was waited to the end)

    @contextmanager
    def timing(self, device: torch.device) -> Iterator[None]:
        _sync(device)
        start = time.perf_counter()
        yield
        _sync(device)
        self.seconds += time.perf_counter() - start


@dataclass
class SiteChoice:
    """One call site's measurement and, once taken, its choice."""

    clock: Optional[CodecClock] = None
    plain: Optional[bool] = None
    estimates: dict[str, float] = field(default_factory=dict)


def probe_link(group: Group, timeout_s: Optional[float], device: torch.device, nbytes: int = PROBE_NBYTES) -> float:
    """Seconds per byte of one ring hop of the group (every rank sends ``nbytes`` to the next while
    receiving from the previous), after a one-byte hop that lines the ranks up."""
    size, rank = group_size(group), group_rank(group)
    nxt, prv = global_rank(group, (rank + 1) % size), global_rank(group, (rank - 1) % size)
    for n in (1, nbytes):
        send = torch.zeros(n, dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        _sync(device)
        start = time.perf_counter()
        start_exchange_ring(send, recv, nxt, prv, group, timeout_s, "the link probe of plain_when_faster").wait()
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds / nbytes


class RelayChoice:
    """The ``plain_when_faster`` choices of one hook: per call site, measured then taken (see the module)."""

    def __init__(self) -> None:
        self.sites: dict[tuple[str, tuple[int, ...]], SiteChoice] = {}
        self.seconds_per_byte: dict[tuple[int, ...], float] = {}

    def clock_for(self, key: str, group: Group, x: torch.Tensor, timeout_s: Optional[float]) -> tuple[bool, Optional[CodecClock]]:
        """Before a compressed relay of ``x`` on ``key``: whether to send it plain, else the clock to
        time it with (``None``: nothing to measure). Takes the site's choice when its measurement is in
        (every rank of the group calls this in the same order, as any collective)."""
        site = self.sites.setdefault((key, group_ranks(group)), SiteChoice())
        if site.plain is not None:
            return site.plain, None
        if site.clock is not None and not site.clock.full and site.clock.hops == group_size(group) - 1:
            site.plain = self._decide(site, group, x, timeout_s)
            return site.plain, None
        site.clock = CodecClock()  # the first call, or a full one: measure (again)
        return False, site.clock

    def _decide(self, site: SiteChoice, group: Group, x: torch.Tensor, timeout_s: Optional[float]) -> bool:
        ranks = group_ranks(group)
        if ranks not in self.seconds_per_byte:
            self.seconds_per_byte[ranks] = probe_link(group, timeout_s, x.device)
        per_byte, hops = self.seconds_per_byte[ranks], group_size(group) - 1
        assert site.clock is not None
        mine = torch.tensor([[hops * x.numel() * x.element_size() * per_byte,
                              site.clock.seconds + hops * site.clock.payload_nbytes * per_byte]], dtype=torch.float64)
        every = all_gather(mine.to(x.device), group, 0, timeout_s).cpu()
        plain_s, compressed_s = (sum(float(v) for v in every[:, j]) for j in range(2))  # rank order: same sums
        site.estimates = {"plain_s": plain_s, "compressed_s": compressed_s}
        return plain_s <= compressed_s

    def as_dict(self) -> dict[str, Any]:
        """The taken choices: ``{key: {"plain": bool, "plain_s", "compressed_s"}}`` (summed over the
        group's ranks; ``key@ranks`` for a key used on several groups)."""
        keys = [key for key, _ in self.sites]
        return {(key if keys.count(key) == 1 else f"{key}@{','.join(map(str, ranks))}"):
                {"plain": site.plain, **site.estimates}
                for (key, ranks), site in self.sites.items() if site.plain is not None}
