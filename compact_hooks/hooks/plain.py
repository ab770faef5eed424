"""Hooks without residual state: plain torch.distributed and casts on the wire."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import collectives as C
from ..collectives.relay import Relay, start_plain_relay
from ..hook import CollectiveCall, CommHook, start_plain_collective
from ..stats import Stats
from ..work import CollectiveWork


class _CountedHook(CommHook):
    """Byte counters of a hook without residual state: per key (``op#n`` without a key), per step."""

    name = "plain"

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self.stats_ = Stats()
        self.auto_counts: dict[str, int] = {}
        self.step = self.request = 0

    def _key(self, call: CollectiveCall) -> str:
        """The call's key (``op#n`` for the n-th keyless call of ``op`` this step)."""
        if call.key is not None:
            return call.key
        n = self.auto_counts.get(call.op, 0)
        self.auto_counts[call.op] = n + 1
        return f"{call.op}#{n}"

    def _track(self, call: CollectiveCall, key: str, work: CollectiveWork, raw_elem_bytes: int,
               wire_elem_bytes: int) -> CollectiveWork:
        """Count the call's bytes when its work is decoded; one outstanding work per key and group."""
        size = C.group_size(call.group)
        numel = call.tensor.numel()

        def finish() -> torch.Tensor:
            out = work.wait()
            self.stats_.record(key, call.op, C.plain_bytes(call.op, numel * raw_elem_bytes, size),
                               C.plain_bytes(call.op, numel * wire_elem_bytes, size), False, plain=True)
            return out
        tracked = CollectiveWork([work], finish, call.tensor.device)
        return self.outstanding().add((key, C.group_ranks(call.group)), tracked, key)

    def _begin(self, call: CollectiveCall) -> Optional[str]:
        """The key of a call on a group of several ranks (checked free), else ``None``."""
        if C.group_size(call.group) == 1:
            return None
        key = call.key if call.key is not None else f"{call.op}#{self.auto_counts.get(call.op, 0)}"
        self.outstanding().check_free((key, C.group_ranks(call.group)), key)
        return self._key(call)

    def _relay(self, call: CollectiveCall, wire_dtype: Optional[torch.dtype]) -> Relay:
        """The plain relay of ``call`` (``wire_dtype`` on the wire), counted per hop; one outstanding
        relay per key and group."""
        key = self._begin(CollectiveCall("ring_exchange", call.tensor, call.group, call.key))
        if key is None:
            return Relay(call.group, [])
        x = call.tensor
        raw = x.numel() * x.element_size()
        wire = x.numel() * torch.empty((), dtype=wire_dtype or x.dtype).element_size()
        relay = start_plain_relay(x, call.group, self.timeout_s, lambda hop: self.stats_.record(
            f"{key}.hop{hop}", "ring_exchange", raw, wire, False, plain=True), wire_dtype)
        if relay.last is not None:
            self.outstanding().add((key, C.group_ranks(call.group)), relay.last, key)
        return relay

    def next_step(self) -> None:
        self.check_idle("next_step()")
        self.stats_.end_step(self.request, self.step)
        self.step += 1
        self.auto_counts.clear()

    def begin_request(self) -> None:
        self.check_idle("begin_request()")
        if self.step:
            self.stats_.end_step(self.request, self.step)
        self.request += 1
        self.step = 0
        self.auto_counts.clear()

    def reset(self) -> None:
        self.check_idle("reset()")
        self.stats_.clear()
        self.auto_counts.clear()
        self.step = self.request = 0

    def stats(self) -> dict[str, Any]:
        """Like every hook's: raw and wire bytes per key and step (raw: the plain collective's bytes)."""
        out = self.stats_.as_dict()
        out.update(hook=self.name, steps=self.step, requests=self.request)
        return out


class PassthroughHook(_CountedHook):
    """Plain torch.distributed: the parity baseline (its stats count raw = wire bytes). ``timeout_s``
    bounds the wait for a peer (``None``: the process group's own timeout)."""

    name = "passthrough"

    def start(self, call: CollectiveCall) -> CollectiveWork:
        key = self._begin(call)
        if key is None:
            return CollectiveWork.completed(call.tensor)
        work = start_plain_collective(call, self.timeout_s)
        return self._track(call, key, work, call.tensor.element_size(), call.tensor.element_size())

    def start_relay(self, call: CollectiveCall) -> Relay:
        """The uncompressed relay ring, one hop ahead (stats per hop under ``<key>.hopN``)."""
        return self._relay(call, None)


class CastHook(_CountedHook):
    """Casts float tensors to ``dtype`` on the wire (all_reduce sums in ``dtype``)."""

    name = "cast"

    def __init__(self, dtype: torch.dtype = torch.bfloat16, timeout_s: Optional[float] = None) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"CastHook dtype must be float16, bfloat16 or float32; got {dtype}")
        super().__init__(timeout_s)
        self.dtype = dtype

    def start(self, call: CollectiveCall) -> CollectiveWork:
        x = call.tensor
        key = self._begin(call)
        if key is None:
            return CollectiveWork.completed(x)
        if not x.is_floating_point() or x.dtype == self.dtype:
            return self._track(call, key, start_plain_collective(call, self.timeout_s), x.element_size(),
                               x.element_size())
        wire = x.to(self.dtype, memory_format=torch.contiguous_format)
        if call.op == "all_reduce":  # the cast is already a private buffer: reduce it in place
            inner = C.start_all_reduce_(wire, call.group, self.timeout_s)
        else:
            inner = start_plain_collective(CollectiveCall(call.op, wire, call.group, call.key, call.dim), self.timeout_s)
        work = CollectiveWork([inner], lambda: inner.wait().to(x.dtype), x.device)
        return self._track(call, key, work, x.element_size(), torch.empty((), dtype=self.dtype).element_size())

    def start_relay(self, call: CollectiveCall) -> Relay:
        """The relay ring with the cast on the wire (cast once, forwarded as cast)."""
        x = call.tensor
        cast = x.is_floating_point() and x.dtype != self.dtype
        return self._relay(call, self.dtype if cast else None)
