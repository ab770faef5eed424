"""CollectiveWork: the pending result of a hook call, in the style of ``torch.distributed``'s
``async_op=True`` works and DDP communication hooks' futures.

``hook.start(call)`` (or ``hook(call, async_op=True)``) encodes at once, starts the transfer in the
background and returns a :class:`CollectiveWork`; ``work.wait()`` waits for the transfer, decodes
(headers checked, receiver bases updated, stats recorded) and returns the tensor. The synchronous
call ``hook(call)`` is ``hook.start(call).wait()``.

* ``wait()`` returns the result; the decode runs exactly once (a lock), on the thread that first
  calls ``wait()`` (or ``get_future().wait()``); a failure (e.g. ``CollectiveTimeoutError``) is
  raised again by every later ``wait()``.
* ``is_completed()``: the transfer has finished (``wait()`` will not block on the network) or the
  result is already decoded; never blocks.
* ``get_future()``: a ``torch.futures.Future`` completed with the decoded tensor when the work is
  decoded. Its ``wait()`` (and that of futures chained with ``then``) drives the decode. The decode
  never runs on a torch.distributed worker thread: it mutates the Session's bases and stats and may
  run small collectives (first-exchange header verdicts, error samples, base checksums), which must
  run on the caller's thread in the same order on every rank. So ``torch.futures.wait_all`` /
  ``collect_all`` (C++) do not drive it: call ``work.wait()`` or ``future.wait()``.

Ordering rule: every rank starts, and waits on, a hook's works in the same order (as with any
collective); one key (per group) has at most one outstanding work (:class:`OutstandingWorkError`
otherwise), and ``next_step()`` / ``begin_request()`` / ``reset()`` with outstanding works raise it too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional, Protocol

import torch

from .errors import CompactHooksError


class OutstandingWorkError(CompactHooksError, RuntimeError):
    """A second call on a key whose work is still outstanding, or a step/request mark while works are
    outstanding: ``wait()`` the work first."""


class Pending(Protocol):
    """One wire stage in flight (see ``collectives.transport.Transfer``)."""

    def is_completed(self) -> bool: ...

    def wait(self) -> None: ...


class Watch:
    """A work seen as a wire stage that is never waited on: a wrapper's ``finish`` runs its own code
    before it waits on (and so decodes) the inner work itself."""

    def __init__(self, work: "CollectiveWork") -> None:
        self.work = work

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> None:
        """Nothing: the wrapper's ``finish`` calls ``work.wait()``."""


class WorkFuture(torch.futures.Future):
    """A Future whose ``wait()`` drives its work's decode on the calling thread (see the module)."""

    def __init__(self, work: "CollectiveWork", devices: Optional[list[torch.device]] = None) -> None:
        super().__init__(devices=devices)
        self._work = work

    def wait(self) -> Any:
        self._work.wait_quietly()
        return super().wait()

    def then(self, callback: Callable[[torch.futures.Future], Any]) -> "WorkFuture":
        child = WorkFuture(self._work, self._work.devices)

        def run(fut: torch.futures.Future) -> None:
            try:
                child.set_result(callback(fut))
            except BaseException as exc:  # noqa: BLE001 - handed to the child future, as torch does
                child.set_exception(exc)

        self.add_done_callback(run)
        return child


class CollectiveWork:
    """The pending result of one hook call: ``wait() -> Tensor``, ``is_completed()``, ``get_future()``.

    ``wire``: the stages in flight (each ``is_completed()`` / ``wait()``); ``finish``: the decode,
    run once at the first ``wait()`` after every wire stage was waited on; ``done``: called once
    after ``finish`` (success or failure), e.g. to drop the work from a hook's outstanding table.
    """

    def __init__(self, wire: Sequence[Pending], finish: Callable[[], torch.Tensor],
                 device: Optional[torch.device] = None, done: Optional[Callable[[], None]] = None) -> None:
        self._wire = list(wire)
        self._finish: Optional[Callable[[], torch.Tensor]] = finish
        self._done: list[Callable[[], None]] = [done] if done is not None else []
        self._lock = threading.RLock()
        self._result: Optional[torch.Tensor] = None
        self._error: Optional[BaseException] = None
        self._future: Optional[WorkFuture] = None
        self.devices = [device] if device is not None and device.type == "cuda" else None

    @classmethod
    def completed(cls, result: torch.Tensor) -> "CollectiveWork":
        """A work whose result is already known (a group of one, a synchronous hook)."""
        work = cls((), lambda: result, result.device)
        work.wait_quietly()
        return work

    @classmethod
    def failed(cls, error: BaseException) -> "CollectiveWork":
        """A work whose ``wait()`` raises ``error``."""
        def finish() -> torch.Tensor:
            raise error
        work = cls((), finish)
        work.wait_quietly()
        return work

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` once the work is decoded or failed (at once if it already is)."""
        with self._lock:
            if self._finish is not None:
                self._done.append(callback)
                return
        callback()

    def is_completed(self) -> bool:
        """Whether ``wait()`` would not block on the network (the transfer finished or the work is decoded)."""
        if self._finish is None:
            return True
        return all(stage.is_completed() for stage in self._wire)

    def wait_quietly(self) -> None:
        """Decode once (waiting for the transfer); keep the result or the error for ``wait()``."""
        with self._lock:
            finish, self._finish = self._finish, None
            if finish is None:
                return
            try:
                for stage in self._wire:
                    stage.wait()
                self._result = finish()
            except BaseException as exc:  # noqa: BLE001 - kept and raised by every wait()
                self._error = exc
            finally:
                self._wire = []
                callbacks, self._done = self._done, []
            for callback in callbacks:
                callback()
            if self._future is not None:
                self._complete(self._future)

    def wait(self) -> torch.Tensor:
        """The collective's result (waiting for the transfer and decoding on the first call)."""
        self.wait_quietly()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def get_future(self) -> torch.futures.Future:
        """A ``torch.futures.Future`` of the result (completed when the work is decoded)."""
        with self._lock:
            if self._future is None:
                self._future = WorkFuture(self, self.devices)
                if self._finish is None:
                    self._complete(self._future)
            return self._future

    def _complete(self, future: WorkFuture) -> None:
        if self._error is not None:
            future.set_exception(self._error)
        else:
            future.set_result(self._result)

    def __repr__(self) -> str:
        state = "decoded" if self._finish is None else ("transferred" if self.is_completed() else "in flight")
        return f"CollectiveWork({state})"


class Outstanding:
    """A hook's works not yet waited on, by slot (key and group): the ordering rule's bookkeeping."""

    def __init__(self) -> None:
        self.works: dict[Any, CollectiveWork] = {}

    def add(self, slot: Any, work: CollectiveWork, name: str) -> CollectiveWork:
        """Track ``work`` under ``slot`` until it is decoded (``name`` appears in errors)."""
        self.check_free(slot, name)
        self.works[slot] = work
        work.add_done_callback(lambda: self.works.pop(slot, None) if self.works.get(slot) is work else None)
        return work

    def check_free(self, slot: Any, name: str) -> None:
        """Raise :class:`OutstandingWorkError` when ``slot`` has an outstanding work."""
        if slot in self.works:
            raise OutstandingWorkError(
                f"{name!r} already has an outstanding async call: wait() its work before starting another call "
                "on the same key (calls on different keys may overlap)")

    def keys(self) -> list[str]:
        return [str(slot[0]) if isinstance(slot, tuple) else str(slot) for slot in self.works]


def check_idle(keys: Sequence[str], what: str) -> None:
    """Raise :class:`OutstandingWorkError` when works are outstanding at a step or request mark."""
    if keys:
        raise OutstandingWorkError(
            f"{what} with outstanding async calls on {', '.join(repr(k) for k in keys)}: wait() every work a hook "
            "started before marking the step or request (every rank in the same order)")


def wait_on_use(work: CollectiveWork, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An ``AsyncCollectiveTensor`` of ``shape`` (``like``'s dtype and device) that waits on ``work`` at
    its first non-view use, as torch's functional collectives' results do: a c10d ``Work`` registered
    for the buffer decodes ``work`` into it when funcol's ``wait_tensor`` finds it. For integrations that
    route functional collectives (diffusers' native context parallel, xfuser, torch's ring attention).
    Relies on torch's private ``_register_work`` and a ``dist.Work`` subclass (torch 2.13)."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import _register_work
    from torch.distributed import _functional_collectives as funcol

    class _DecodeOnWait(dist.Work):
        def __init__(self, out: torch.Tensor, pending: CollectiveWork) -> None:
            super().__init__()
            self.out, self.pending = out, pending

        def wait(self, timeout: Any = None) -> bool:
            if self.pending is not None:
                pending, self.pending = self.pending, None
                self.out.copy_(pending.wait())
            return True

    out = like.new_empty(tuple(shape))
    _register_work(out, _DecodeOnWait(out, work))
    return funcol.AsyncCollectiveTensor(out)

