"""Faults injected into emulated hosts (:mod:`compact_hooks.launcher.netns`) while a job runs (root).

* :func:`set_link_rate` changes one host's link rate in both directions (``tc qdisc replace`` of
  the tbf on the host's ``eth1`` and on its port of the switch namespace); :func:`restore_link`
  puts the rate the hosts were built with back.
* :func:`loss_burst` drops packets for a while. This kernel has netfilter's ``statistic`` match but
  the machine has no ``iptables``/``nft`` binary, so loss comes from tbf: every switch port gets a
  queue of ``limit`` bytes and a bucket of ``burst`` bytes, so packets arriving faster than that
  are dropped *inside the network* (the switch namespace), and TCP has to retransmit them.
  :func:`qdisc_counts` and :func:`tcp_retransmits` count what was dropped and resent.
* :func:`pause` stops a process (SIGSTOP) for a while and resumes it (SIGCONT), always;
  :func:`resume` sends SIGCONT (to a process that stopped itself).

Every change is undone by the context managers even when their body raises.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Optional

from .netns import Hosts, auto_burst

LATENCY = "50ms"


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`tc {' '.join(args)}` in {ns} failed: {result.stderr.strip()}")
    return result


def switch_namespace(hosts: Hosts) -> str:
    """The switch namespace of ``hosts`` (its name is the hosts' tag with ``-sw``)."""
    return hosts.names[0].rsplit("-", 1)[0] + "-sw"


def link_ends(hosts: Hosts, host: int) -> list[tuple[str, str]]:
    """``(namespace, device)`` of both ends of host ``host``'s link: its ``eth1`` and its switch port."""
    if not 0 <= host < len(hosts):
        raise ValueError(f"host must be in 0..{len(hosts) - 1}; got {host}")
    return [(hosts.names[host], hosts.ifname), (switch_namespace(hosts), f"p{host}")]


def _set_tbf(ns: str, dev: str, rate: str, burst: int, limit: Optional[int] = None) -> None:
    size = ["limit", str(limit)] if limit is not None else ["latency", LATENCY]
    _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst), *size)


def _reset(hosts: Hosts, ns: str, dev: str) -> None:
    """The qdisc the hosts were built with: their tbf, or none."""
    if hosts.rate:
        _set_tbf(ns, dev, hosts.rate, hosts.burst or auto_burst(hosts.rate))
    else:
        _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)


def set_link_rate(hosts: Hosts, host: int, rate: str) -> None:
    """Cap host ``host``'s link at ``rate`` (both directions) from now on, with a 2 ms bucket."""
    for ns, dev in link_ends(hosts, host):
        _set_tbf(ns, dev, rate, auto_burst(rate))


def restore_link(hosts: Hosts, host: int) -> None:
    for ns, dev in link_ends(hosts, host):
        _reset(hosts, ns, dev)


@contextlib.contextmanager
def link_rate(hosts: Hosts, host: int, rate: str) -> Iterator[None]:
    """Host ``host``'s link at ``rate`` inside the block; the original rate after it."""
    try:
        set_link_rate(hosts, host, rate)
        yield
    finally:
        restore_link(hosts, host)


_COUNTS = re.compile(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)")


def qdisc_counts(ns: str, dev: str) -> tuple[int, int]:
    """``(sent, dropped)`` packets of the root qdisc of ``dev`` in ``ns`` since it was created."""
    out = _tc(ns, "-s", "qdisc", "show", "dev", dev, "root").stdout
    match = _COUNTS.search(out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def tcp_retransmits(ns: str) -> int:
    """TCP segments retransmitted in namespace ``ns`` so far (``RetransSegs`` of /proc/net/snmp)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True,
                         text=True, check=True).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(rows[0], rows[1]))["RetransSegs"])


@contextlib.contextmanager
def loss_burst(hosts: Hosts, rate: Optional[str] = None, limit: int = 3000, burst: int = 3000) -> Iterator[dict[str, int]]:
    """Drop packets in the switch while the block runs: every switch port becomes a tbf at ``rate``
    (default: the hosts' rate, else 1gbit) with a ``limit``-byte queue and a ``burst``-byte bucket.
    Once the block ends the yielded dict holds ``sent`` and ``dropped`` (packets of the switch
    ports during the burst) and ``retransmits`` (TCP segments the hosts retransmitted meanwhile)."""
    rate = rate or hosts.rate or "1gbit"
    sw = switch_namespace(hosts)
    ports = [f"p{i}" for i in range(len(hosts))]
    counts: dict[str, int] = {}

    def totals() -> tuple[int, int, int]:  # a tbf replaced by a tbf keeps its counters
        pairs = [qdisc_counts(sw, port) for port in ports]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs), sum(tcp_retransmits(ns) for ns in hosts.names)

    before = totals()
    try:
        for port in ports:
            _set_tbf(sw, port, rate, burst, limit=limit)
        yield counts
    finally:
        with contextlib.suppress(RuntimeError, subprocess.CalledProcessError, KeyError, IndexError):
            after = totals()
            counts.update(zip(("sent", "dropped", "retransmits"), (a - b for a, b in zip(after, before))))
        for port in ports:
            _reset(hosts, sw, port)


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def resume(pid: int) -> bool:
    """SIGCONT ``pid`` (a no-op if it runs); False if it is gone."""
    return _signal(pid, signal.SIGCONT)


def pause(pid: int, seconds: float) -> bool:
    """Stop ``pid`` for ``seconds``, then resume it; False if it was already gone."""
    if not _signal(pid, signal.SIGSTOP):
        return False
    try:
        time.sleep(seconds)
    finally:
        _signal(pid, signal.SIGCONT)
    return True
