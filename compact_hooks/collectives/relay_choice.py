"""Plain or compressed, per relay-ring call site: ``"plain_when_faster": true``.

On a fast link the plain relay can be the faster one: the codec's encode and ``P - 1`` decodes sit on
the ring's critical path (each hop waits for the previous rank's), while the bytes they save take
little time to move. Measured in ``bench e2e --mode ring`` at 1 Gbit/s on CPU the int2 relay was 1.37x
slower than the plain one. With ``plain_when_faster`` a :class:`~compact_hooks.hooks.CompactHook`
measures and decides once per relay call site (key and group), for the rest of its life:

1. the site's first compressed (not full) relay runs as usual and its span is timed: from the start
   of the relay (before the encode) until its last hop is decoded, the caller's compute between hops
   included (:class:`Span`);
2. at its next relay every rank all-gathers a lower bound of the plain relay's time (the ``P - 1``
   hops of the plain block at the link's seconds per byte, from one timed ring hop of
   :data:`PROBE_NBYTES` per group) and its compressed span. When the bound's sum exceeds the spans'
   sum the site stays compressed (slow links decide here, with no plain trial); otherwise this relay
   is sent plain, as a trial, and its span is timed;
3. at the relay after the trial the ranks all-gather both spans: the site sends plain from then on
   when the plain spans' sum is not larger, else compressed; the sums include the trials of the
   group's sites that decided before it (one relay's span is a noisy sample; the sites of a group
   are usually layers of one model and move the same shapes).

Every rank sums the gathered values in rank order, so all take the same choice. A plain relay does not
touch the site's residual stream: sender and receivers keep the bases of its last compressed relay, so
the stream resumes in lock step after a trial. Spans are wall-clock times; on CUDA the device is
synchronized at both ends of the two measured relays of a site (and around the link probe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .plain import all_gather, group_size, ring_exchange
from .relay import Relay
from .transport import Group, group_ranks

PROBE_NBYTES = 64 * 1024  # one timed ring hop per group: 26 ms at 20 Mbit/s, 0.5 ms at 1 Gbit/s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Span:
    """The wall time of one relay, from its start to its last hop's decode (on CUDA the device is
    synchronized at both ends); ``full``: it was a full send (known once watched)."""

    device: torch.device
    start: float = 0.0
    seconds: Optional[float] = None
    full: bool = False

    def __post_init__(self) -> None:
        _sync(self.device)
        self.start = time.perf_counter()

    def watch(self, relay: Relay) -> None:
        """Time ``relay``: the span ends when its last hop is decoded."""
        self.full = relay.full
        if relay.last is not None:
            relay.last.add_done_callback(self._end)

    def _end(self) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self.start


@dataclass
class SiteChoice:
    """One call site's measurements and, once taken, its choice."""

    compressed: Optional[Span] = None
    plain_trial: Optional[Span] = None
    plain: Optional[bool] = None
    estimates: dict[str, float] = field(default_factory=dict)


def probe_link(group: Group, timeout_s: Optional[float], device: torch.device, nbytes: int = PROBE_NBYTES) -> float:
    """Seconds per byte of one ring hop of the group (every rank sends ``nbytes`` to the next while
    receiving from the previous): the time of that hop less the time of a one-byte hop (the latency;
    it also lines the ranks up), over ``nbytes``."""
    seconds: list[float] = []
    for n in (1, 1, nbytes):
        send = torch.zeros(n, dtype=torch.uint8, device=device)
        _sync(device)
        start = time.perf_counter()
        ring_exchange(send, group, timeout_s)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return max(seconds[2] - seconds[1], 0.0) / nbytes


def summed(values: list[float], group: Group, device: torch.device, timeout_s: Optional[float]) -> list[float]:
    """Each of ``values`` summed over the group's ranks, in rank order (the same floats on every rank)."""
    mine = torch.tensor([values], dtype=torch.float64, device=device)
    every = all_gather(mine, group, 0, timeout_s).cpu()
    return [sum(float(v) for v in every[:, j]) for j in range(len(values))]


class RelayChoice:
    """The ``plain_when_faster`` choices of one hook: per call site, measured then taken (see the module)."""

    def __init__(self) -> None:
        self.sites: dict[tuple[str, tuple[int, ...]], SiteChoice] = {}
        self.seconds_per_byte: dict[tuple[int, ...], float] = {}
        # per group: the summed spans of every trial so far, (plain, compressed): each site's trial is one
        # noisy sample, so a site decides on its own and its group's earlier trials together
        self.trials: dict[tuple[int, ...], tuple[float, float]] = {}

    def before(self, key: str, group: Group, x: torch.Tensor, timeout_s: Optional[float]) -> tuple[bool, Optional[Span]]:
        """Before a relay of ``x`` on ``key`` that would be compressed: whether to send it plain, and the
        span to time it with (``None``: nothing to measure; :meth:`Span.watch` the relay). Every rank of
        the group calls this in the same order, as any collective."""
        ranks = group_ranks(group)
        site = self.sites.setdefault((key, ranks), SiteChoice())
        if site.plain is not None:
            return site.plain, None
        measured = site.compressed
        if measured is None or measured.full or measured.seconds is None:  # first call, or a full send
            site.compressed = Span(x.device)
            return False, site.compressed
        if site.plain_trial is None:
            if ranks not in self.seconds_per_byte:
                self.seconds_per_byte[ranks] = probe_link(group, timeout_s, x.device)
            bound = (group_size(group) - 1) * x.numel() * x.element_size() * self.seconds_per_byte[ranks]
            plain_bound, compressed = summed([bound, measured.seconds], group, x.device, timeout_s)
            if plain_bound > compressed:  # plain cannot win: no trial
                return self._take(site, False, plain_bound_s=plain_bound, compressed_s=compressed), None
            site.plain_trial = Span(x.device)
            return True, site.plain_trial
        trial = site.plain_trial.seconds if site.plain_trial.seconds is not None else float("inf")
        plain, compressed = summed([trial, measured.seconds], group, x.device, timeout_s)
        before = self.trials.get(ranks, (0.0, 0.0))
        self.trials[ranks] = (before[0] + plain, before[1] + compressed)
        won = self.trials[ranks][0] <= self.trials[ranks][1]
        return self._take(site, won, plain_s=plain, compressed_s=compressed), None

    @staticmethod
    def _take(site: SiteChoice, plain: bool, **estimates: float) -> bool:
        site.plain, site.estimates = plain, estimates
        return plain

    def as_dict(self) -> dict[str, Any]:
        """The taken choices: ``{key: {"plain": bool, <seconds summed over the group's ranks>}}``
        (``plain_bound_s`` when no trial was needed, ``plain_s`` after one; ``key@ranks`` for a key
        used on several groups)."""
        keys = [key for key, _ in self.sites]
        return {(key if keys.count(key) == 1 else f"{key}@{','.join(map(str, ranks))}"):
                {"plain": site.plain, **site.estimates}
                for (key, ranks), site in self.sites.items() if site.plain is not None}
