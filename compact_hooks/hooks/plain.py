"""Hooks without residual state: plain torch.distributed and casts on the wire."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import collectives as C
from ..hook import CollectiveCall, CommHook, plain_collective
from ..stats import Stats


class _CountedHook(CommHook):
    """Byte counters of a hook without residual state: per key (``op#n`` without a key), per step."""

    name = "plain"

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self.stats_ = Stats()
        self.auto_counts: dict[str, int] = {}
        self.step = self.request = 0

    def _record(self, call: CollectiveCall, raw_elem_bytes: int, wire_elem_bytes: int) -> None:
        size = C.group_size(call.group)
        if size == 1:
            return
        key = call.key
        if key is None:
            n = self.auto_counts.get(call.op, 0)
            self.auto_counts[call.op] = n + 1
            key = f"{call.op}#{n}"
        numel = call.tensor.numel()
        self.stats_.record(key, call.op, C.plain_bytes(call.op, numel * raw_elem_bytes, size),
                           C.plain_bytes(call.op, numel * wire_elem_bytes, size), False, plain=True)

    def next_step(self) -> None:
        self.stats_.end_step(self.request, self.step)
        self.step += 1
        self.auto_counts.clear()

    def begin_request(self) -> None:
        if self.step:
            self.stats_.end_step(self.request, self.step)
        self.request += 1
        self.step = 0
        self.auto_counts.clear()

    def reset(self) -> None:
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

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        out = plain_collective(call, self.timeout_s)
        self._record(call, call.tensor.element_size(), call.tensor.element_size())
        return out


class CastHook(_CountedHook):
    """Casts float tensors to ``dtype`` on the wire (all_reduce sums in ``dtype``)."""

    name = "cast"

    def __init__(self, dtype: torch.dtype = torch.bfloat16, timeout_s: Optional[float] = None) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"CastHook dtype must be float16, bfloat16 or float32; got {dtype}")
        super().__init__(timeout_s)
        self.dtype = dtype

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        x = call.tensor
        if not x.is_floating_point() or x.dtype == self.dtype:
            out = plain_collective(call, self.timeout_s)
            self._record(call, x.element_size(), x.element_size())
            return out
        self._record(call, x.element_size(), torch.empty((), dtype=self.dtype).element_size())
        if C.group_size(call.group) == 1:
            return x
        wire = x.to(self.dtype, memory_format=torch.contiguous_format)
        if call.op == "all_reduce":  # the cast is already a private buffer: reduce it in place
            return C.all_reduce_(wire, call.group, self.timeout_s).to(x.dtype)
        return plain_collective(CollectiveCall(call.op, wire, call.group, call.key, call.dim), self.timeout_s).to(x.dtype)
