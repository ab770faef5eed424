"""StaleHook: DistriFusion's stale activations, the baseline compact-hooks is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import collectives as C
from ..hook import CollectiveCall, CommHook, start_plain_collective
from ..stats import Stats
from ..work import CollectiveWork


@dataclass
class _StaleEntry:
    transfer: C.Transfer  # waited once: a gloo send/recv work must not be waited on twice
    buffer: torch.Tensor
    local: torch.Tensor

    def wait(self) -> None:
        self.transfer.wait()


class StaleHook(CommHook):
    """DistriFusion-style stale activations: after ``warmup_steps`` exact exchanges of a key in a
    request, return the previous step's remote data (the local part fresh) and start this step's
    exchange asynchronously, overlapping it with compute. The baseline the paper beats.

    Each exchange sends a private copy of the caller's tensor: a caller may reuse its buffer in
    place as soon as the call returns. ``timeout_s`` bounds the wait for a peer."""

    def __init__(self, warmup_steps: int = 1, stats: Optional[Stats] = None, timeout_s: Optional[float] = None) -> None:
        if warmup_steps < 1:
            raise ValueError(f"StaleHook needs warmup_steps >= 1 (the first step has nothing stale); got {warmup_steps}")
        self.warmup_steps = warmup_steps
        # keyed by (key, group ranks), like the outstanding works: one key on two groups (two models
        # with the same module names) keeps two schedules
        self.pending: dict[tuple[str, tuple[int, ...]], _StaleEntry] = {}
        self.exchanges: dict[tuple[str, tuple[int, ...]], int] = {}
        self.auto_counts: dict[tuple[str, tuple[int, ...]], int] = {}
        self.stats_ = stats if stats is not None else Stats()
        self.step = 0
        self.request = 0
        self.timeout_s = timeout_s

    def start(self, call: CollectiveCall) -> CollectiveWork:
        """Warm-up steps: the exact exchange. Later steps: this step's exchange is started, and the
        work's ``wait()`` returns the previous step's (waiting for it if it is still in flight)."""
        x = call.tensor
        size = C.group_size(call.group)
        if size == 1:
            return CollectiveWork.completed(x)
        if call.op == "all_to_all":
            C.check_rows(x, size)
        ranks = C.group_ranks(call.group)
        key = call.key if call.key is not None else f"{call.op}#{self.auto_counts.get((call.op, ranks), 0)}"
        slot = (key, ranks)
        self.outstanding().check_free(slot, key)
        if call.key is None:
            self.auto_counts[(call.op, ranks)] = self.auto_counts.get((call.op, ranks), 0) + 1
        sent = C.plain_bytes(call.op, x.numel() * x.element_size(), size)
        self.stats_.record(key, call.op, sent, sent, False)
        count = self.exchanges.get(slot, 0)
        self.exchanges[slot] = count + 1
        previous = self.pending.pop(slot, None)
        if previous is not None and previous.local.shape != x.shape:
            previous.wait()
            previous = None
        if count < self.warmup_steps or previous is None:
            if previous is not None:
                previous.wait()
            if count + 1 < self.warmup_steps:
                return self.outstanding().add(slot, start_plain_collective(call, self.timeout_s), key)
            # the last exact step: its exchange is also the stale data of the next step
            entry = self.pending[slot] = self._start(call, x, size)
            work = CollectiveWork([entry.transfer], lambda: self._exact(call, entry), x.device)
            return self.outstanding().add(slot, work, key)
        self.pending[slot] = self._start(call, x, size)
        work = CollectiveWork([previous.transfer], lambda: self._assemble(call, previous, x, size), x.device)
        return self.outstanding().add(slot, work, key)

    def _start(self, call: CollectiveCall, x: torch.Tensor, size: int) -> _StaleEntry:
        x = x.clone(memory_format=torch.contiguous_format)  # the send outlives the call: never the caller's buffer
        buf, enqueue = self._enqueue(call, x, size)
        # a hung peer must not block the exit either: gloo gives up after timeout_s too
        return _StaleEntry(C.start_transfer(enqueue, call.group, self.timeout_s, "the stale exchange"), buf, x)

    @staticmethod
    def _enqueue(call: CollectiveCall, x: torch.Tensor, size: int) -> tuple[torch.Tensor, Callable[[], Any]]:
        """The receive buffer and the function that enqueues the async exchange into it."""
        if call.op == "all_gather":
            buf = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
            fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return buf, lambda: fn(buf.view(-1), x.view(-1), group=call.group, async_op=True)
        if call.op == "all_to_all":
            buf = torch.empty_like(x)
            return buf, lambda: dist.all_to_all_single(buf, x, group=call.group, async_op=True)
        if call.op == "all_reduce":
            buf = x.clone()
            return buf, lambda: dist.all_reduce(buf, group=call.group, async_op=True)
        buf = torch.empty_like(x)
        return buf, lambda: dist.batch_isend_irecv(C.ring_ops(x, buf, call.group))

    def _exact(self, call: CollectiveCall, entry: _StaleEntry) -> torch.Tensor:
        """The exact result of a completed exchange (copies: the buffer is kept for the next step)."""
        if call.op == "all_gather":
            return torch.cat(entry.buffer.unbind(0), dim=call.dim)
        return entry.buffer.clone()

    @staticmethod
    def own_part_fresh(call: CollectiveCall, parts: Sequence[torch.Tensor], x: torch.Tensor,
                       size: int) -> torch.Tensor:
        """The result of ``call`` (an ``all_gather`` along ``call.dim`` or an ``all_to_all``) from its
        ``size`` stale ``parts`` (one per group rank), with this rank's own part taken fresh from ``x``."""
        rank = C.group_rank(call.group)
        gather = call.op == "all_gather"
        parts = list(parts)
        parts[rank] = x if gather else x.chunk(size, dim=0)[rank]
        return torch.cat(parts, dim=call.dim if gather else 0)

    def _assemble(self, call: CollectiveCall, prev: _StaleEntry, x: torch.Tensor, size: int) -> torch.Tensor:
        if call.op in ("all_gather", "all_to_all"):
            parts = prev.buffer.unbind(0) if call.op == "all_gather" else prev.buffer.chunk(size, dim=0)
            return self.own_part_fresh(call, parts, x, size)
        if call.op == "all_reduce":
            return prev.buffer - prev.local + x
        return prev.buffer

    def _drain(self) -> None:
        for entry in self.pending.values():
            entry.wait()
        self.pending.clear()

    def begin_request(self) -> None:
        self.check_idle("begin_request()")
        self._drain()
        self.exchanges.clear()
        self.auto_counts.clear()
        self.request += 1
        self.step = 0

    def next_step(self) -> None:
        self.check_idle("next_step()")
        self.stats_.end_step(self.request, self.step)
        self.step += 1
        self.auto_counts.clear()

    def reset(self) -> None:
        self.check_idle("reset()")
        self._drain()
        self.exchanges.clear()
        self.stats_.clear()

    def stats(self) -> dict[str, Any]:
        out = self.stats_.as_dict()
        out.update(hook="stale", steps=self.step, requests=self.request)
        return out
