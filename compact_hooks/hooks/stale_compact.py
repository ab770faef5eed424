"""StaleCompactHook: DistriFusion's stale schedule on CompactFusion's compressed residuals.

Each call starts this step's exchange (a :class:`CompactHook` exchange: residual, error feedback)
and returns the *previous* step's decoded result, with this rank's own part fresh, so the exchange
has a whole step of compute to finish in. The exchange of step ``t`` is decoded (its bases advance)
at the same call site's call of step ``t + 1``, just before that step's exchange is started: one
work in flight per call site and group, on every rank in the same order.

Calls whose role (the key's part after its last ``":"``) is in ``fresh_roles`` are exchanged fresh
(compressed, synchronous). The default, ``["o"]``, keeps attention outputs fresh: a Ulysses output
all-to-all computed from stale inputs and then used one step late would be two steps old (the
uncompressed ``StaleHook`` stales every call). So are the first ``max(1, warmup_steps)`` calls of a
call site in a request and non-float tensors (sizes, masks). Bytes are recorded when an exchange is
decoded: one step after it was sent (the last step's at ``drain``, ``begin_request`` or ``reset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from .. import collectives as C
from ..config import CompactConfig, load_config
from ..hook import CollectiveCall, CommHook
from ..policy import CallSite
from ..residual import Session
from ..work import CollectiveWork
from .compact import CompactHook
from .stale import StaleHook

if TYPE_CHECKING:
    from ..collectives.relay import Relay


@dataclass
class _Site:
    """One call site on one group: its exchange in flight and the peers' part of the last result."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    calls: int = 0
    work: Optional[CollectiveWork] = None  # started by the previous call, decoded by the next
    sent: Optional[torch.Tensor] = None  # what that exchange sent (a private copy)
    last: Optional[torch.Tensor] = None  # the peers' part of the latest decoded result


class StaleCompactHook(CommHook):
    """Compressed stale exchanges: see the module. ``config`` is what :class:`CompactHook` takes
    (its codec, residual mode, rules, ``timeout_s``); ``fresh_roles`` defaults to the config's
    ``stale_fresh_roles``."""

    def __init__(self, config: Any = None, fresh_roles: Optional[Sequence[str]] = None) -> None:
        cfg: CompactConfig = load_config(config)
        self.fresh_roles = frozenset(cfg.stale_fresh_roles if fresh_roles is None else fresh_roles)
        self.compact = CompactHook(cfg)
        # ranks that disagree on the schedule would mix fresh and stale results: the handshake refuses
        self.compact._handshake["stale"] = sorted(self.fresh_roles)
        self.config = cfg
        self.warmup_steps = max(1, cfg.warmup_steps)
        self.sites: dict[tuple[str, tuple[int, ...]], _Site] = {}

    @property
    def session(self) -> Session:
        return self.compact.session

    @property
    def timeout_s(self) -> Optional[float]:  # type: ignore[override]
        return self.compact.timeout_s

    def sessions(self) -> list[Session]:
        return self.compact.sessions()

    def start(self, call: CollectiveCall) -> CollectiveWork:
        """Decode the call site's exchange of the previous step, start this step's, and return the
        stale result as a completed work; warm-up calls and fresh roles return the fresh result."""
        x = call.tensor
        size = C.group_size(call.group)
        if size == 1:
            return CollectiveWork.completed(x)
        if call.op == "all_to_all":
            C.check_rows(x, size)
        ranks = C.group_ranks(call.group)
        key = call.key if call.key is not None else self.compact.session.auto_key(call.op, ranks)
        if not x.is_floating_point() or CallSite(key, call.op, size).role in self.fresh_roles:
            return CollectiveWork.completed(self.compact.start(
                CollectiveCall(call.op, x, call.group, key=key, dim=call.dim)).wait())
        # the exchange outlives the call (and decodes the own part from it): never the caller's buffer
        inner = CollectiveCall(call.op, x.clone(memory_format=torch.contiguous_format), call.group, key=key,
                               dim=call.dim)
        site = self.sites.get((key, ranks))
        if site is not None:
            self._collect(site, call)
        if site is None or site.shape != tuple(x.shape) or site.dtype != x.dtype:
            site = self.sites[(key, ranks)] = _Site(tuple(x.shape), x.dtype)
        site.calls += 1
        if site.calls <= self.warmup_steps or site.last is None:
            out = self.compact.start(inner).wait()
            site.last = self._remote(call.op, out, inner.tensor)
            return CollectiveWork.completed(out)
        stale = site.last
        assert stale is not None
        site.work, site.sent = self.compact.start(inner), inner.tensor
        return CollectiveWork.completed(self._assemble(call, stale, x, size))

    def start_relay(self, call: CollectiveCall) -> "Relay":
        """Ring attention's K/V relay, stale: one all-gather of this step's block (key ``call.key``)
        started now, and the hops served from the previous step's (hop ``h``: group rank ``r - h``'s
        block), so every hop is one step old, not ``h`` steps as a stale exchange per hop would be.
        A fresh role takes the CompactHook's relay."""
        from ..collectives.relay import Relay

        x = call.tensor
        size = C.group_size(call.group)
        if size == 1:
            return Relay(call.group, [])
        ranks = C.group_ranks(call.group)
        key = call.key if call.key is not None else self.compact.session.auto_key("ring_exchange", ranks)
        if not x.is_floating_point() or CallSite(key, "ring_exchange", size).role in self.fresh_roles:
            return self.compact.start_relay(CollectiveCall("ring_exchange", x, call.group, key=key))
        blocks = self.start(CollectiveCall("all_gather", x, call.group, key=key, dim=0)).wait().chunk(size, dim=0)
        rank = C.group_rank(call.group)
        return Relay(call.group, [CollectiveWork.completed(blocks[(rank - h) % size]) for h in range(1, size)])

    def _collect(self, site: _Site, call: CollectiveCall) -> None:
        """Decode the exchange in flight (waiting for it if it has not arrived yet)."""
        work, sent, site.work, site.sent = site.work, site.sent, None, None
        if work is not None and sent is not None:
            site.last = self._remote(call.op, work.wait(), sent)

    @staticmethod
    def _remote(op: str, out: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """The peers' part of a result (all_reduce: the sum less this rank's input; else the result,
        whose own part :meth:`_assemble` replaces)."""
        return out - sent if op == "all_reduce" else out

    @staticmethod
    def _assemble(call: CollectiveCall, remote: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
        """The peers' (stale) part with this rank's own part fresh."""
        if call.op == "ring_exchange":
            return remote.clone()
        if call.op == "all_reduce":
            return remote + x
        parts = remote.chunk(size, dim=call.dim if call.op == "all_gather" else 0)
        return StaleHook.own_part_fresh(call, parts, x, size)

    def drain(self) -> None:
        """Decode every exchange in flight (in call order: the same on every rank)."""
        for (key, _), site in self.sites.items():
            work, site.work, site.sent = site.work, None, None
            if work is not None:
                work.wait()

    def begin_request(self) -> None:
        self.check_idle("begin_request()")
        self.drain()
        self.sites.clear()
        self.compact.begin_request()

    def next_step(self) -> None:
        """A step ended; the exchanges started in it stay in flight (they are the next step's data)."""
        self.check_idle("next_step()")
        for session in self.compact.sessions():
            session.next_step()

    def reset(self) -> None:
        self.check_idle("reset()")
        self.drain()
        self.sites.clear()
        self.compact.reset()

    def stats(self) -> dict[str, Any]:
        out = self.compact.stats()
        in_flight = sum(site.work is not None for site in self.sites.values())
        out.update(stale=True, fresh_roles=sorted(self.fresh_roles), in_flight=in_flight)
        return out
