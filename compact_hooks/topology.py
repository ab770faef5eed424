"""Which host each rank of a process group runs on, and the link class of a group.

Hostnames are exchanged once per process group: one all-gather of fixed-size byte buffers
(:data:`HOSTNAME_BYTES` each), waiting at most ``timeout_s`` for a peer (else
:class:`~compact_hooks.errors.CollectiveTimeoutError`, as every other exchange). The result is
cached per group (by its tuple of global ranks) in a :class:`Topology` object that a hook or an
integration owns; a group whose ranks are all covered by an earlier exchange (a subgroup of the
world, say) is derived from it without communicating.

``link_class(group)`` is ``"intra_host"`` when every rank of the group is on one host, else
``"inter_host"``: a collective over such a group crosses the slow link.
"""

from __future__ import annotations

import os
import socket
from typing import Literal, Optional

import torch.distributed as dist

from .collectives import gather_texts, group_ranks, group_size

LinkClass = Literal["intra_host", "inter_host"]
LINK_CLASSES: tuple[str, ...] = ("intra_host", "inter_host")
HOSTNAME_BYTES = 256
HOSTNAME_ENV = "COMPACT_HOOKS_HOSTNAME"

Group = Optional[dist.ProcessGroup]


def local_hostname() -> str:
    """``$COMPACT_HOOKS_HOSTNAME`` if set (containers that share a hostname), else the host's name."""
    return os.environ.get(HOSTNAME_ENV) or socket.gethostname()


def _checked(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not raw or len(raw) > HOSTNAME_BYTES or b"\0" in raw:
        raise ValueError(f"a hostname must be 1..{HOSTNAME_BYTES} bytes of UTF-8 without NUL; got {name!r}"
                         f" (set {HOSTNAME_ENV} to a shorter name)")
    return raw


class Topology:
    """Hostnames of the ranks of each process group asked about, cached per group.

    ``hostname`` is this rank's host (default :func:`local_hostname`). Every rank of a group must ask
    about the group at the same point (the first question is a collective over it), which is what a
    hook does: all ranks of a group call the same collective in the same order. ``timeout_s`` bounds
    the wait for a peer in the exchange (``None``: the process group's own timeout); a call's own
    ``timeout_s`` replaces it.
    """

    def __init__(self, hostname: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        self.hostname = hostname if hostname is not None else local_hostname()
        self.timeout_s = timeout_s
        self._encoded = _checked(self.hostname)
        self._hosts: dict[tuple[int, ...], tuple[str, ...]] = {}
        self.exchanges = 0  # all-gathers done (one per group not derivable from earlier ones)

    def hosts(self, group: Group, timeout_s: Optional[float] = None) -> tuple[str, ...]:
        """The hostname of every rank of ``group``, by group rank (an exchange waits at most
        ``timeout_s``, default the Topology's, for a peer)."""
        ranks = group_ranks(group)
        known = self._hosts.get(ranks)
        if known is not None:
            return known
        known = self._derive(ranks)
        if known is None:
            known = self._exchange(group, len(ranks), timeout_s if timeout_s is not None else self.timeout_s)
        self._hosts[ranks] = known
        return known

    def _derive(self, ranks: tuple[int, ...]) -> Optional[tuple[str, ...]]:
        for seen, names in self._hosts.items():
            where = dict(zip(seen, names))
            if all(r in where for r in ranks):
                return tuple(where[r] for r in ranks)
        return None

    def _exchange(self, group: Group, size: int, timeout_s: Optional[float]) -> tuple[str, ...]:
        if size == 1 or group_size(group) == 1:
            return (self.hostname,)
        every = gather_texts(self._encoded, HOSTNAME_BYTES, group, timeout_s, "the hostname exchange")
        self.exchanges += 1
        return tuple(every)

    def link_class(self, group: Group, timeout_s: Optional[float] = None) -> LinkClass:
        """``"intra_host"`` if every rank of ``group`` is on one host, else ``"inter_host"``."""
        return "intra_host" if len(set(self.hosts(group, timeout_s))) <= 1 else "inter_host"

    def ranks_by_host(self, group: Group, timeout_s: Optional[float] = None) -> list[list[int]]:
        """Group ranks per host, hosts in order of their first rank, ranks ascending."""
        by: dict[str, list[int]] = {}
        for rank, host in enumerate(self.hosts(group, timeout_s)):
            by.setdefault(host, []).append(rank)
        return list(by.values())

    def __repr__(self) -> str:
        return f"Topology(hostname={self.hostname!r}, groups={len(self._hosts)}, exchanges={self.exchanges})"
