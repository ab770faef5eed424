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

Asynchronous calls, in the style of ``torch.distributed``'s ``async_op=True``::

    work = hook.start(call)            # or hook(call, async_op=True): encode, start the transfer
    ...                                # compute while the bytes move
    out = work.wait()                  # decode, update the bases; work.get_future() for a Future

``hook(call)`` is ``hook.start(call).wait()``. See :mod:`compact_hooks.work` for the ordering rule.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist

from . import collectives as C
from .collectives.relay import PerHopRelay, Relay, hop_key
from .work import CollectiveWork, Outstanding, check_idle

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
    """Base class of hooks. A subclass implements :meth:`start` (asynchronous: encode, start the
    transfer, return a :class:`~compact_hooks.work.CollectiveWork`) or only ``__call__`` (synchronous;
    ``start`` then returns an already completed work of it). Step/request hooks are no-ops here.
    ``timeout_s``: how long the hook waits for a peer (``None``: the process group's timeout);
    integrations use it for their own collectives too."""

    timeout_s: Optional[float] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``__call__(call)`` also accepts ``async_op`` (``True``: :meth:`start`)."""
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None or "async_op" in inspect.signature(call).parameters:
            return

        @functools.wraps(call)
        def __call__(self: CommHook, c: CollectiveCall, async_op: bool = False) -> Any:
            return self.start(c) if async_op else call(self, c)

        __call__.sync_call = True  # type: ignore[attr-defined]
        cls.__call__ = __call__  # type: ignore[method-assign]

    def __call__(self, call: CollectiveCall, async_op: bool = False) -> Union[torch.Tensor, CollectiveWork]:
        """The collective's result; with ``async_op=True`` the work of :meth:`start` instead."""
        work = self.start(call)
        return work if async_op else work.wait()

    def start(self, call: CollectiveCall) -> CollectiveWork:
        """Start ``call``: encode now, move the bytes in the background; ``wait()`` the work for the result.
        The default runs a subclass's synchronous ``__call__`` and returns its completed work."""
        if getattr(type(self).__call__, "sync_call", False):
            return CollectiveWork.completed(self(call))
        raise NotImplementedError(f"{type(self).__name__} implements neither start(call) nor __call__(call)")

    def start_relay(self, call: CollectiveCall) -> Relay:
        """Relay ``call.tensor`` (a ``ring_exchange`` call) around ``call.group``'s ring: a
        :class:`~compact_hooks.collectives.relay.Relay` of ``P - 1`` hop works, hop ``h`` returning the
        block of group rank ``(r - h) % P``. The default is the per-hop path (a ``ring_exchange`` of
        each hop's block through :meth:`start`, keys ``<key>.hopN``, started when the hop is waited);
        hooks with a relay of their own forward each rank's block unchanged, one hop ahead."""
        return PerHopRelay(call.tensor, call.group, lambda t, hop: self.start(
            CollectiveCall("ring_exchange", t, call.group, key=hop_key(call.key, hop))))

    def outstanding(self) -> Outstanding:
        """The works this hook started and nobody waited on yet (the ordering rule's bookkeeping)."""
        table = self.__dict__.get("_outstanding")
        if table is None:
            table = self.__dict__["_outstanding"] = Outstanding()
        return table

    def outstanding_keys(self) -> list[str]:
        """Keys with a started, not yet waited work (this hook's and its inner hooks')."""
        return self.outstanding().keys()

    def check_idle(self, what: str) -> None:
        """Raise :class:`~compact_hooks.work.OutstandingWorkError` when works are outstanding."""
        check_idle(self.outstanding_keys(), what)

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
    it adds (metering, tracing, fault injection) and calls the base. A subclass that overrides only
    ``__call__`` stays synchronous (``start`` runs it and returns a completed work); one that
    overrides ``start`` (calling ``super().start``) stays asynchronous."""

    def __init__(self, inner: CommHook) -> None:
        self.inner = inner

    def __call__(self, call: CollectiveCall, async_op: bool = False) -> Union[torch.Tensor, CollectiveWork]:
        work = self.inner.start(call)
        return work if async_op else work.wait()

    def start(self, call: CollectiveCall) -> CollectiveWork:
        if getattr(type(self).__call__, "sync_call", False):  # a subclass's own synchronous __call__
            return CollectiveWork.completed(self(call))
        return self.inner.start(call)

    def start_relay(self, call: CollectiveCall) -> Relay:
        if getattr(type(self).__call__, "sync_call", False):  # a subclass's own synchronous __call__: per hop
            return super().start_relay(call)
        return self.inner.start_relay(call)

    def outstanding_keys(self) -> list[str]:
        return [*self.outstanding().keys(), *self.inner.outstanding_keys()]

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
    return start_plain_collective(call, timeout_s).wait()


def start_plain_collective(call: CollectiveCall, timeout_s: Optional[float] = None) -> CollectiveWork:
    """Start ``call`` with plain torch.distributed; ``wait()`` the work (at most ``timeout_s`` for peers)."""
    return C.start_plain(call.op, call.tensor, call.group, call.dim, timeout_s)
