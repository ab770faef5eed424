"""CompactHook: residual compression with error feedback (CompactFusion), the point of the project."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import collectives as C
from ..config import CompactConfig, load_config
from ..hook import CollectiveCall, CommHook, plain_collective
from ..residual import Session
from ..wire import FLOAT_DTYPES


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

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        x = call.tensor
        session = self.session
        if C.group_size(call.group) == 1:
            return x
        key = call.key if call.key is not None else session.auto_key(call.op)
        # before the plain path too: ranks that disagree on which ops they compress would pair a
        # compressed collective with a plain one
        C.agree_on_settings(session, call.group, {"collectives": sorted(self.collectives)})
        if (call.op not in self.collectives or not x.is_floating_point() or x.numel() == 0
                or x.dtype not in FLOAT_DTYPES or session.is_lossless(x.dtype)):
            return self._plain(call, key)
        if call.op == "all_gather":
            return C.compressed_all_gather(x, call.group, session, key, call.dim)
        if call.op == "all_to_all":
            return C.compressed_all_to_all(x, call.group, session, key)
        if call.op == "all_reduce":
            if session.compressor.summable:
                wire_dtype = getattr(session.compressor, "wire_dtype", x.dtype)
                if torch.empty((), dtype=wire_dtype).element_size() >= x.element_size():
                    return self._plain(call, key)  # a cast that is not smaller: plain and exact
                return self._summable_all_reduce(call, key)
            return C.compressed_all_reduce(x, call.group, session, key)
        return C.compressed_ring_exchange(x, call.group, session, key)

    def _plain(self, call: CollectiveCall, key: str) -> torch.Tensor:
        sent = C.plain_bytes(call.op, call.tensor.numel() * call.tensor.element_size(), C.group_size(call.group))
        self.session.stats.record(key, call.op, sent, sent, True)
        return plain_collective(call, self.session.timeout_s)

    def _summable_all_reduce(self, call: CollectiveCall, key: str) -> torch.Tensor:
        """Lossless casts are summed by ``all_reduce`` in the wire dtype."""
        x = call.tensor
        wire = x.to(getattr(self.session.compressor, "wire_dtype", x.dtype), memory_format=torch.contiguous_format,
                    copy=True)
        size = C.group_size(call.group)
        self.session.stats.record(key, "all_reduce", C.plain_bytes("all_reduce", x.numel() * x.element_size(), size),
                                  C.plain_bytes("all_reduce", wire.numel() * wire.element_size(), size), False)
        return C.all_reduce_(wire, call.group, self.session.timeout_s).to(x.dtype)

    def begin_request(self) -> None:
        self.session.begin_request()

    def next_step(self) -> None:
        self.session.next_step()

    def reset(self) -> None:
        self.session.reset()

    def stats(self) -> dict[str, Any]:
        out = self.session.stats.as_dict()
        out.update(hook="compact", compressor=self.session.compressor.spec(), residual=self.session.mode,
                   steps=self.session.step, requests=self.session.request,
                   memory_bytes=self.session.memory_bytes(), nonfinite=self.session.nonfinite())
        return out
