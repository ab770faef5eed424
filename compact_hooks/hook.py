"""CollectiveCall and the CommHook interface: what a parallel layer calls instead of a raw collective.

A hook takes a :class:`CollectiveCall` and returns the collective's result::

    out = hook(CollectiveCall("all_gather", k_local, group, key="transformer_blocks.3.attn:k"))

Result layouts (``P`` ranks in ``group``):

* ``all_gather``: every rank's tensor concatenated along ``dim`` in rank order;
* ``all_to_all``: ``tensor`` is split into ``P`` equal chunks along dim 0, chunk ``j`` goes to rank
  ``j``; the result has the same shape, chunk ``j`` received from rank ``j``
  (``all_to_all_single`` with equal splits);
* ``all_reduce``: the elementwise sum over the group;
* ``ring_exchange``: send to rank ``(r + 1) % P``, return what rank ``(r - 1) % P`` sent.

Hooks are stateful objects in the style of PyTorch's DDP communication hooks: they keep per-key
state, know the current step and request (``next_step``, ``begin_request``) and report
``stats()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from . import collectives as C
from .config import CompactConfig, load_config
from .residual import Session
from .wire import FLOAT_DTYPES

Op = Literal["all_gather", "all_to_all", "all_reduce", "ring_exchange"]
OPS: tuple[str, ...] = ("all_gather", "all_to_all", "all_reduce", "ring_exchange")


@dataclass
class CollectiveCall:
    """One collective a layer wants done.

    ``key`` names the call site (``"transformer_blocks.3.attn:k"``); without one the hook numbers
    the calls of each step. ``dim`` is the concatenation dim of ``all_gather``.
    """

    op: Op
    tensor: torch.Tensor
    group: Optional[dist.ProcessGroup] = None
    key: Optional[str] = None
    dim: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"CollectiveCall.op must be one of {', '.join(OPS)}; got {self.op!r}")
        if not isinstance(self.tensor, torch.Tensor):
            raise TypeError(f"CollectiveCall.tensor must be a torch.Tensor; got {type(self.tensor).__name__}")


class CommHook:
    """Base class of hooks. Subclasses implement :meth:`__call__`; step/request hooks are no-ops here."""

    def __call__(self, call: CollectiveCall) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def begin_request(self) -> None:
        """A new request (pipeline call) starts: per-request state is dropped."""

    def next_step(self) -> None:
        """The current denoising step ended."""

    def reset(self) -> None:
        """Drop all state."""

    def stats(self) -> dict[str, Any]:
        return {}


def plain_collective(call: CollectiveCall) -> torch.Tensor:
    """Run ``call`` with plain torch.distributed."""
    if call.op == "all_gather":
        return C.all_gather(call.tensor, call.group, dim=call.dim)
    if call.op == "all_to_all":
        return C.all_to_all(call.tensor, call.group)
    if call.op == "all_reduce":
        return C.all_reduce(call.tensor, call.group)
    return C.ring_exchange(call.tensor, call.group)


class PassthroughHook(CommHook):
    """Plain torch.distributed: the parity baseline."""

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        return plain_collective(call)


class CastHook(CommHook):
    """Casts float tensors to ``dtype`` on the wire (all_reduce sums in ``dtype``)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"CastHook dtype must be float16, bfloat16 or float32; got {dtype}")
        self.dtype = dtype

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        x = call.tensor
        if not x.is_floating_point() or x.dtype == self.dtype:
            return plain_collective(call)
        wire = x.to(self.dtype)
        if call.op == "all_reduce":  # the cast is already a private buffer: reduce it in place
            return C.all_reduce_(wire, call.group).to(x.dtype) if C.group_size(call.group) > 1 else x
        return plain_collective(CollectiveCall(call.op, wire, call.group, call.key, call.dim)).to(x.dtype)


class CompactHook(CommHook):
    """Residual compression with error feedback (CompactFusion), the point of the project.

    ``config`` is a :class:`~compact_hooks.config.CompactConfig`, a ``"compact_hooks"`` block, a
    DeepSpeed-style config holding one, or a path to such a JSON file. Non-float tensors, ops not
    listed in ``config.collectives`` and codecs lossless for the tensor's dtype take the plain path.
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
                return self._summable_all_reduce(call, key)
            return C.compressed_all_reduce(x, call.group, session, key)
        return C.compressed_ring_exchange(x, call.group, session, key)

    def _plain(self, call: CollectiveCall, key: str) -> torch.Tensor:
        sent = C.plain_bytes(call.op, call.tensor.numel() * call.tensor.element_size(), C.group_size(call.group))
        self.session.stats.record(key, call.op, sent, sent, True)
        return plain_collective(call)

    def _summable_all_reduce(self, call: CollectiveCall, key: str) -> torch.Tensor:
        """Lossless casts are summed by ``all_reduce`` in the wire dtype."""
        x = call.tensor
        wire = x.to(getattr(self.session.compressor, "wire_dtype", x.dtype), copy=True)
        size = C.group_size(call.group)
        self.session.stats.record(key, "all_reduce", C.plain_bytes("all_reduce", x.numel() * x.element_size(), size),
                                  C.plain_bytes("all_reduce", wire.numel() * wire.element_size(), size), False)
        return C.all_reduce_(wire, call.group).to(x.dtype)

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


def build_hook(config: Any = None) -> CommHook:
    """The hook a config asks for: ``hook`` selects compact, stale, passthrough or cast;
    ``enabled: false`` gives a :class:`PassthroughHook`."""
    cfg = load_config(config)
    if not cfg.enabled or cfg.hook == "passthrough":
        return PassthroughHook()
    if cfg.hook == "cast":
        return CastHook(getattr(torch, cfg.cast_dtype))
    if cfg.hook == "stale":
        from .stale import StaleHook

        return StaleHook(max(1, cfg.warmup_steps))
    return CompactHook(cfg)
