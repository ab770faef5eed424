"""Hooks without residual state: plain torch.distributed and casts on the wire."""

from __future__ import annotations

from typing import Optional

import torch

from .. import collectives as C
from ..hook import CollectiveCall, CommHook, plain_collective


class PassthroughHook(CommHook):
    """Plain torch.distributed: the parity baseline. ``timeout_s`` bounds the wait for a peer
    (``None``: the process group's own timeout)."""

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        return plain_collective(call, self.timeout_s)


class CastHook(CommHook):
    """Casts float tensors to ``dtype`` on the wire (all_reduce sums in ``dtype``)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, timeout_s: Optional[float] = None) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"CastHook dtype must be float16, bfloat16 or float32; got {dtype}")
        self.dtype = dtype
        self.timeout_s = timeout_s

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        x = call.tensor
        if not x.is_floating_point() or x.dtype == self.dtype:
            return plain_collective(call, self.timeout_s)
        if C.group_size(call.group) == 1:
            return x
        wire = x.to(self.dtype, memory_format=torch.contiguous_format)
        if call.op == "all_reduce":  # the cast is already a private buffer: reduce it in place
            return C.all_reduce_(wire, call.group, self.timeout_s).to(x.dtype)
        return plain_collective(CollectiveCall(call.op, wire, call.group, call.key, call.dim), self.timeout_s).to(x.dtype)
