"""Transfer: one wire stage in flight, the unit a :class:`~compact_hooks.work.CollectiveWork` waits on.

The async torch.distributed ops of a stage are enqueued under :func:`transport_timeout` (so gloo
itself gives up on a dead or hung peer after ``timeout_s``) and waited on once, each through
:func:`~compact_hooks.collectives.transport.wait` (a failure becomes ``CollectiveTimeoutError``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from .transport import Group, transport_timeout, wait


class Transfer:
    """The works of one wire stage: ``is_completed()`` without blocking, ``wait()`` once."""

    def __init__(self, works: list[Any], timeout_s: Optional[float], what: str) -> None:
        self.works = works
        self.timeout_s = timeout_s
        self.what = what
        self.done = False

    def is_completed(self) -> bool:
        return self.done or all(work.is_completed() for work in self.works)

    def wait(self) -> None:
        """Wait for every work (a gloo work must not be waited on twice: later calls return at once)."""
        if self.done:
            return
        self.done = True
        for work in self.works:
            wait(work, self.timeout_s, self.what)


def start_transfer(enqueue: Callable[[], Union[Any, list[Any]]], group: Group, timeout_s: Optional[float],
                   what: str) -> Transfer:
    """Run ``enqueue()`` (async torch.distributed calls returning a work or a list of works) under
    ``timeout_s`` as the backend's own timeout; return the stage in flight."""
    with transport_timeout(group, timeout_s):
        works = enqueue()
    return Transfer(works if isinstance(works, list) else [works], timeout_s, what)
