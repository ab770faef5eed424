"""CompactHook: residual compression with error feedback (CompactFusion), the point of the project."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import collectives as C
from ..collectives.relay import Relay, hop_key, start_compressed_relay, start_plain_relay
from ..collectives.relay_choice import RelayChoice
from ..config import CompactConfig, load_config
from ..hook import CollectiveCall, CommHook
from ..policy import CallSite, first_match, rules_fingerprint
from ..residual import Session
from ..topology import Topology
from ..wire import FLOAT_DTYPES
from ..work import CollectiveWork


class CompactHook(CommHook):
    """Residual compression with error feedback (CompactFusion).

    ``config`` is a :class:`~compact_hooks.config.CompactConfig`, a ``"compact_hooks"`` block, a
    DeepSpeed-style config holding one, or a path to such a JSON file. Non-float tensors, ops not
    listed in ``config.collectives`` and codecs lossless for the tensor's dtype take the plain path
    (with the same ``timeout_s``).
    """

    def __init__(self, config: Any = None, session: Optional[Session] = None) -> None:
        self.config: CompactConfig = load_config(config)
        self.session = session if session is not None else Session.from_config(self.config)
        self.collectives = frozenset(self.config.collectives)
        self.rule_sessions: dict[int, Session] = {}  # rule index -> its session (sharing the stats)
        self._handshake = {"collectives": sorted(self.collectives), "links": self.config.links}
        # a "link" rule needs the group's link class: hostnames exchanged once per group
        self.topology: Optional[Topology] = Topology() if any(r.match.link for r in self.config.rules) else None
        if self.config.rules:
            self._handshake["rules"] = rules_fingerprint(self.config.rules)
        # plain_when_faster: per relay call site, plain or compressed from measured times (one decision collective)
        self.relay_choice: Optional[RelayChoice] = RelayChoice() if self.config.plain_when_faster else None
        if self.relay_choice is not None:
            self._handshake["plain_when_faster"] = True

    def start(self, call: CollectiveCall) -> CollectiveWork:
        """Encode now and start the transfer; the work's ``wait()`` decodes (see :mod:`compact_hooks.work`).
        One outstanding work per key and group: a second start raises OutstandingWorkError."""
        x = call.tensor
        size = C.group_size(call.group)
        if size == 1:
            return CollectiveWork.completed(x)
        ranks = C.group_ranks(call.group)
        if call.key is not None:  # before any collective: a refused call changes nothing
            self.outstanding().check_free((call.key, ranks), call.key)
        key = call.key if call.key is not None else self.session.auto_key(call.op, ranks)
        # before the plain path too: ranks that disagree on which ops they compress would pair a
        # compressed collective with a plain one
        C.agree_on_settings(self.session, call.group, self._handshake)
        C.agree_on_tensor(self.session, call.group, key, call.op, x)  # once per call site and shape
        link = self.topology.link_class(call.group) if self.topology is not None else None
        session = self.session_for(key, call.op, size, link)
        return self.outstanding().add((key, ranks), self._start(call, key, session, size), key)

    def _start(self, call: CollectiveCall, key: str, session: Optional[Session], size: int) -> CollectiveWork:
        x = call.tensor
        if (session is None or call.op not in self.collectives or not x.is_floating_point() or x.numel() == 0
                or x.dtype not in FLOAT_DTYPES or session.is_lossless(x.dtype)):
            return self._plain(call, key)
        if call.op == "all_gather":
            return C.start_compressed_all_gather(x, call.group, session, key, call.dim)
        if call.op == "all_to_all":
            return C.start_compressed_all_to_all(x, call.group, session, key)
        if call.op == "all_reduce" and session.compressor.summable:
            if C.plain_is_cheaper(session, "all_reduce", x, size):
                return self._plain(call, key)  # a cast that is not narrower: plain and exact
            return self._summable_all_reduce(call, key, session)
        if call.op == "all_reduce":
            return C.start_compressed_all_reduce(x, call.group, session, key)
        return C.start_compressed_ring_exchange(x, call.group, session, key)

    def start_relay(self, call: CollectiveCall) -> Relay:
        """The relay ring of ``call.tensor`` (see :mod:`compact_hooks.collectives.relay`): encoded once,
        forwarded unchanged, decoded against each source's base; stats per hop under ``<key>.hopN``.
        Calls that :meth:`start` sends plain take the plain relay (forwarded, counted as plain)."""
        x = call.tensor
        size = C.group_size(call.group)
        if size == 1:
            return Relay(call.group, [])
        ranks = C.group_ranks(call.group)
        if call.key is not None:
            self.outstanding().check_free((call.key, ranks), call.key)
        key = call.key if call.key is not None else self.session.auto_key("ring_exchange", ranks)
        C.agree_on_settings(self.session, call.group, self._handshake)
        C.agree_on_tensor(self.session, call.group, key, "ring_exchange", x)
        link = self.topology.link_class(call.group) if self.topology is not None else None
        session = self.session_for(key, "ring_exchange", size, link)
        plain, span = False, None
        if (session is None or "ring_exchange" not in self.collectives or not x.is_floating_point()
                or x.numel() == 0 or x.dtype not in FLOAT_DTYPES or session.is_lossless(x.dtype)
                or C.plain_is_cheaper(session, "ring_exchange", x, size)):
            plain = True
        elif self.relay_choice is not None:
            plain, span = self.relay_choice.before(key, call.group, x, session.timeout_s)
        if plain:
            nbytes = x.numel() * x.element_size()
            relay = start_plain_relay(x, call.group, self.session.timeout_s, lambda hop: self.session.stats.record(
                hop_key(key, hop), "ring_exchange", nbytes, nbytes, False, ranks, plain=True))
        else:
            relay = start_compressed_relay(x, call.group, session, key)
        if span is not None:  # plain_when_faster measures this relay
            span.watch(relay)
        if relay.last is not None:
            self.outstanding().add((key, ranks), relay.last, key)
        return relay

    @property
    def timeout_s(self) -> Optional[float]:  # type: ignore[override]
        return self.session.timeout_s

    def session_for(self, key: str, op: str, group_size: int, link: Optional[str] = None) -> Optional[Session]:
        """The session whose settings apply to a call site (the first matching rule's, else the
        defaults); ``None`` for a call a rule sends plain."""
        index = first_match(self.config.rules, CallSite(key, op, group_size, link)) if self.config.rules else None
        if index is None:
            return self.session
        rule = self.config.rules[index]
        if rule.plain:
            return None
        session = self.rule_sessions.get(index)
        if session is None:
            session = Session.from_settings(self.config.with_overrides(rule.overrides()), self.session.stats)
            session.request, session.step = self.session.request, self.session.step
            self.rule_sessions[index] = session
        return session

    def sessions(self) -> list[Session]:
        """The default session and every rule's."""
        return [self.session, *self.rule_sessions.values()]

    def _plain(self, call: CollectiveCall, key: str) -> CollectiveWork:
        return C.start_plain_recorded(self.session, key, call.op, call.tensor, call.group, call.dim)

    def _summable_all_reduce(self, call: CollectiveCall, key: str, session: Session) -> CollectiveWork:
        """Lossless casts are summed by ``all_reduce`` in the wire dtype."""
        x = call.tensor
        wire = x.to(getattr(session.compressor, "wire_dtype", x.dtype), memory_format=torch.contiguous_format,
                    copy=True)
        size = C.group_size(call.group)
        inner = C.start_all_reduce_(wire, call.group, session.timeout_s)

        def finish() -> torch.Tensor:
            out = inner.wait().to(x.dtype)
            session.stats.record(key, "all_reduce", C.plain_bytes("all_reduce", x.numel() * x.element_size(), size),
                                 C.plain_bytes("all_reduce", wire.numel() * wire.element_size(), size), False,
                                 C.group_ranks(call.group))
            return out
        return CollectiveWork([inner], finish, x.device)

    def begin_request(self) -> None:
        self.check_idle("begin_request()")
        for session in self.sessions():
            session.begin_request()

    def next_step(self) -> None:
        self.check_idle("next_step()")
        for session in self.sessions():
            session.next_step()

    def reset(self) -> None:
        self.check_idle("reset()")
        for session in self.sessions():
            session.reset()
        if self.relay_choice is not None:  # measured again
            self.relay_choice = RelayChoice()

    def stats(self) -> dict[str, Any]:
        sessions = self.sessions()
        out = self.session.stats.as_dict()
        out.update(hook="compact", compressor=self.session.compressor.spec(), residual=self.session.mode,
                   steps=self.session.step, requests=self.session.request,
                   memory_bytes=sum(s.memory_bytes() for s in sessions),
                   host_memory_bytes=sum(s.host_memory_bytes() for s in sessions),  # base_device "cpu"
                   nonfinite=self.session.nonfinite() + sum(s.nonfinite() - s.stats.nonfinite for s in sessions[1:]))
        if self.config.rules:
            out["rules"] = {str(i): s.compressor.spec() for i, s in self.rule_sessions.items()}
        if self.relay_choice is not None:
            out["relay_choice"] = self.relay_choice.as_dict()
        return out
