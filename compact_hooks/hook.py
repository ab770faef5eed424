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
``stats()``. This module holds only the interface; the built-in hooks live in
:mod:`compact_hooks.hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from . import collectives as C

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
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"CollectiveCall.key must be a str or None; got {type(self.key).__name__}")
        if self.op == "all_to_all" and self.tensor.dim() == 0:
            raise ValueError("all_to_all splits dim 0 over the ranks, and a 0-dim tensor has none: pass a tensor "
                             "whose dim 0 is divisible by the group size")
        if self.op == "all_gather":
            ndim = self.tensor.dim()
            if ndim == 0:
                raise ValueError("all_gather concatenates along a dim, and a 0-dim tensor has none: "
                                 "pass tensor.reshape(1) (or use all_reduce)")
            if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not -ndim <= self.dim < ndim:
                raise ValueError(f"CollectiveCall.dim must be an int in [{-ndim}, {ndim}) for a {ndim}-dim tensor; "
                                 f"got {self.dim!r}")


class CommHook:
    """Base class of hooks. Subclasses implement :meth:`__call__`; step/request hooks are no-ops here.
    ``timeout_s``: how long the hook waits for a peer (``None``: the process group's timeout);
    integrations use it for their own collectives too."""

    timeout_s: Optional[float] = None

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


class WrappingHook(CommHook):
    """A hook around another (``inner``), in the style of DDP's composable hook wrappers: every call,
    step and request mark, ``stats()`` and ``timeout_s`` go to ``inner``; a subclass overrides what
    it adds (metering, tracing, fault injection) and calls the base."""

    def __init__(self, inner: CommHook) -> None:
        self.inner = inner

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        return self.inner(call)

    @property
    def timeout_s(self) -> Optional[float]:  # type: ignore[override]
        return self.inner.timeout_s

    def begin_request(self) -> None:
        self.inner.begin_request()

    def next_step(self) -> None:
        self.inner.next_step()

    def reset(self) -> None:
        self.inner.reset()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


def plain_collective(call: CollectiveCall, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Run ``call`` with plain torch.distributed (waiting at most ``timeout_s`` for peers)."""
    if call.op == "all_gather":
        return C.all_gather(call.tensor, call.group, call.dim, timeout_s)
    if call.op == "all_to_all":
        return C.all_to_all(call.tensor, call.group, timeout_s)
    if call.op == "all_reduce":
        return C.all_reduce(call.tensor, call.group, timeout_s)
    return C.ring_exchange(call.tensor, call.group, timeout_s)
