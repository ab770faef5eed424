"""Rank discovery: map whatever launched this process to RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE,
MASTER_ADDR and MASTER_PORT before torch.distributed or DeepSpeed initialises.

Launchers recognised (their variables):

* Open MPI ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``;
* MPICH / Hydra ``mpiexec``: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``;
* torchrun and the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* Slurm ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_TASKS_PER_NODE``,
  ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``. Slurm's variables describe the job step, so they are
  ignored when another launcher's variables are present (mpirun or torchrun inside ``sbatch``).

The master address is never guessed from ``hostname -I``: it is ``master_addr`` (a flag), else
``MASTER_ADDR``, else the IPv4 address of the interface named by ``ifname`` / ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` on rank 0 (shared over MPI with mpi4py under mpirun), else ``127.0.0.1``
when all ranks are on one host, else (Slurm) the first host of the job's node list.
Anything else is an error that says what to set.

Once :func:`apply` has set the variables, DeepSpeed's own MPI discovery (which takes the address from
``hostname -I``) is skipped.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import struct
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from compact_hooks.errors import CompactHooksError

DEFAULT_PORT = 29500
SIOCGIFADDR = 0x8915
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

Broadcast = Callable[[Any], Any]
"""``broadcast(value)`` returns rank 0's ``value`` on every rank (a collective: all ranks call it)."""


class RankDiscoveryError(CompactHooksError, RuntimeError):
    """The launcher's variables are missing, malformed or contradictory; the message says what to set."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and how the ranks find rank 0."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int
    launcher: str
    ifname: Optional[str] = None

    @property
    def single_node(self) -> bool:
        return self.local_size == self.world_size

    def env(self) -> dict[str, str]:
        """The variables torch.distributed (``env://``) and DeepSpeed read."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_SIZE": str(self.local_size),
            "LOCAL_WORLD_SIZE": str(self.local_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }
        return env


@dataclass(frozen=True)
class _Source:
    """One launcher's view of the ranks (local fields may be unknown)."""

    launcher: str
    rank: int
    size: int
    local_rank: Optional[int]
    local_size: Optional[int]
    names: str  # the variables, for messages


def _int(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise RankDiscoveryError(f"{name}={raw!r} is not an integer; fix or unset {name}") from None


def _source(environ: Mapping[str, str], launcher: str, rank: str, size: str, local_rank: str,
            local_size: tuple[str, ...]) -> Optional[_Source]:
    r = _int(environ, rank)
    if r is None:
        return None
    s = _int(environ, size)
    if s is None:
        raise RankDiscoveryError(f"{rank} is set but {size} is not: set {size} to the number of ranks")
    ls = next((v for v in (_int(environ, name) for name in local_size) if v is not None), None)
    return _Source(launcher, r, s, _int(environ, local_rank), ls, f"{rank}/{size}")


def _slurm_local_size(environ: Mapping[str, str]) -> Optional[int]:
    per_node = _int(environ, "SLURM_NTASKS_PER_NODE")
    if per_node is not None:
        return per_node
    spec, node = environ.get("SLURM_TASKS_PER_NODE"), _int(environ, "SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):  # "2(x3),1" = 2,2,2,1
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise RankDiscoveryError(f"SLURM_TASKS_PER_NODE={spec!r} is malformed; set SLURM_NTASKS_PER_NODE")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def _sources(environ: Mapping[str, str]) -> tuple[list[_Source], Optional[_Source]]:
    """The non-Slurm sources present, and the Slurm one (if any)."""
    env_launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else (
        "deepspeed" if "CROSS_RANK" in environ else "env")
    found = [
        _source(environ, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK", ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
        _source(environ, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",)),
        _source(environ, env_launcher, "RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")),
    ]
    slurm = None
    procid = _int(environ, "SLURM_PROCID")
    if procid is not None:
        ntasks = _int(environ, "SLURM_NTASKS")
        ntasks = ntasks if ntasks is not None else _int(environ, "SLURM_NPROCS")
        if ntasks is None:
            raise RankDiscoveryError("SLURM_PROCID is set but SLURM_NTASKS is not: launch the ranks with srun")
        slurm = _Source("slurm", procid, ntasks, _int(environ, "SLURM_LOCALID"), _slurm_local_size(environ),
                        "SLURM_PROCID/SLURM_NTASKS")
    return [s for s in found if s is not None], slurm


def _choose(environ: Mapping[str, str]) -> tuple[str, int, int, Optional[int], Optional[int]]:
    sources, slurm = _sources(environ)
    if not sources and slurm is None:
        raise RankDiscoveryError(
            "nothing identifies this process's rank: launch it with mpirun, torchrun, the deepspeed launcher, "
            "srun or `compact-hooks launch`, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    primary = sources[0] if sources else slurm
    assert primary is not None
    for other in sources[1:]:
        if (other.rank, other.size) != (primary.rank, primary.size):
            raise RankDiscoveryError(
                f"{primary.launcher} says rank {primary.rank} of {primary.size} ({primary.names}) but "
                f"{other.launcher} says rank {other.rank} of {other.size} ({other.names}): unset the stale "
                f"variables (probably {other.names.split('/')[0]} from an outer launcher)")
        for field in ("local_rank", "local_size"):
            a, b = getattr(primary, field), getattr(other, field)
            if a is not None and b is not None and a != b:
                raise RankDiscoveryError(
                    f"{primary.launcher} and {other.launcher} disagree on the {field.replace('_', ' ')} "
                    f"({a} vs {b}): unset the stale variables of one of them")
    local_rank, local_size = primary.local_rank, primary.local_size
    helpers = sources[1:] + ([slurm] if slurm is not None and slurm is not primary else [])
    for other in helpers:  # fill unknown local fields from a source that agrees on the ranks
        if (other.rank, other.size) == (primary.rank, primary.size):
            local_rank = local_rank if local_rank is not None else other.local_rank
            local_size = local_size if local_size is not None else other.local_size
    if not 0 <= primary.rank < primary.size:
        raise RankDiscoveryError(f"rank {primary.rank} is outside 0..{primary.size - 1} ({primary.names})")
    if local_rank is not None and local_size is not None and not 0 <= local_rank < local_size:
        raise RankDiscoveryError(f"local rank {local_rank} is outside 0..{local_size - 1} ({primary.launcher})")
    return primary.launcher, primary.rank, primary.size, local_rank, local_size


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def interface_ipv4(ifname: str) -> str:
    """The IPv4 address of network interface ``ifname`` (ioctl SIOCGIFADDR, else ``ip -4 addr show``)."""
    name = ifname.split(",")[0].strip()
    if not name or len(name) > 15:
        raise RankDiscoveryError(f"{ifname!r} is not a network interface name; pass e.g. --ifname eth0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        pass
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", name],
                             capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"\binet\s+(\d+\.\d+\.\d+\.\d+)", out)
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    known = ", ".join(n for _, n in socket.if_nameindex())
    raise RankDiscoveryError(
        f"network interface {name!r} has no IPv4 address or does not exist on {socket.gethostname()} "
        f"(interfaces: {known}); pass --ifname / set GLOO_SOCKET_IFNAME to one that connects the hosts")


def free_port(addr: str = "") -> int:
    """A TCP port that is free on ``addr`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if match is None or not (match.group(1) or match.group(2)):
        raise RankDiscoveryError(f"cannot read the Slurm node list {nodelist!r}: set MASTER_ADDR")
    prefix, ranges, suffix = match.groups()
    first = re.split(r"[-,]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def _port(value: Any, where: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 1 <= port <= 65535:
        raise RankDiscoveryError(f"{where}={value!r} is not a TCP port (1..65535)")
    return port


def discover(environ: Mapping[str, str] = os.environ, *, master_addr: Optional[str] = None,
             master_port: Optional[int] = None, ifname: Optional[str] = None,
             broadcast: Optional[Broadcast] = None) -> RankInfo:
    """Work out this process's :class:`RankInfo` from ``environ`` and the arguments.

    Pure given its inputs: it reads ``environ`` (never ``os.environ`` unless passed), the local
    interfaces, and calls ``broadcast`` (rank 0's value to every rank, e.g. :func:`mpi_broadcast`)
    only under an MPI launcher when the master address or port is not given; without ``broadcast``
    a job spanning hosts needs ``master_addr`` or ``MASTER_ADDR``.
    """
    launcher, rank, size, local_rank, local_size = _choose(environ)
    ifname = ifname or next((environ[v] for v in IFNAME_VARS if environ.get(v)), None)
    addr = master_addr or environ.get("MASTER_ADDR") or None
    port: Optional[int] = None
    if master_port is not None:
        port = _port(master_port, "master_port")
    elif environ.get("MASTER_PORT"):
        port = _port(environ["MASTER_PORT"], "MASTER_PORT")
    if local_rank is None or local_size is None:
        if size == 1 or (addr is not None and _is_loopback(addr)):
            local_rank, local_size = rank, size
        else:
            missing = "LOCAL_RANK" if local_rank is None else "LOCAL_SIZE"
            raise RankDiscoveryError(
                f"{launcher} gives no {missing.lower().replace('_', ' ')}: set {missing} "
                f"(ranks on this host are numbered 0..LOCAL_SIZE-1)")
    one_host = local_size == size

    def rank0_endpoint() -> tuple[Optional[str], Optional[int], Optional[str]]:
        """(addr, port, error) as rank 0 sees them; an error travels to every rank instead of a hang."""
        try:
            a = addr or (interface_ipv4(ifname) if ifname else ("127.0.0.1" if one_host else None))
        except RankDiscoveryError as exc:
            return None, None, str(exc)
        if a is None:
            return None, None, (
                "the ranks span hosts and nothing names rank 0's address: pass --master-addr, set MASTER_ADDR, "
                "or name the interface that connects the hosts with --ifname / GLOO_SOCKET_IFNAME")
        return a, port if port is not None else free_port(), None

    if launcher == "slurm":
        if addr is None and not one_host:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if nodelist:
                addr = _first_slurm_host(nodelist)
        if port is None and _int(environ, "SLURM_JOB_ID") is not None:
            port = DEFAULT_PORT + int(environ["SLURM_JOB_ID"]) % 1000  # fewer clashes between jobs on a node
    mpi = launcher in ("openmpi", "mpich")
    if (addr is None or port is None) and broadcast is not None and mpi:
        mine = rank0_endpoint() if rank == 0 else (None, None, None)
        addr, port, error = broadcast(mine)
        if error:
            raise RankDiscoveryError(f"rank 0 reports: {error}")
        if addr is None or port is None:
            raise RankDiscoveryError(
                "rank 0's address did not arrive over MPI: mpi4py's MPI is not the one whose mpirun started the "
                "ranks (use the mpirun next to python), or set MASTER_ADDR and MASTER_PORT")
    elif addr is None:
        if not one_host:
            how = ("set MASTER_ADDR, or let init_distributed() share rank 0's address over MPI "
                   "(needs mpi4py and --ifname / GLOO_SOCKET_IFNAME)") if mpi else "set MASTER_ADDR"
            raise RankDiscoveryError(f"the {size} ranks span hosts and rank 0's address is unknown: "
                                     f"pass --master-addr or {how}")
        addr = interface_ipv4(ifname) if ifname else "127.0.0.1"
    assert addr is not None
    return RankInfo(rank, size, local_rank, local_size, addr, port if port is not None else DEFAULT_PORT,
                    launcher, ifname)


def apply(info: RankInfo, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write ``info`` into ``environ`` (and the interface into ``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME`` unless set), so torch.distributed and DeepSpeed see one consistent world."""
    environ.update(info.env())
    if info.ifname:
        for var in IFNAME_VARS:
            environ.setdefault(var, info.ifname)


def mpi_broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of ``MPI.COMM_WORLD``.

    Imports mpi4py, which initialises MPI; when that import is what initialised it, MPI is
    finalised again right after the broadcast: left initialised, mpi4py finalises it at exit, and
    Open MPI's ``MPI_Finalize`` waits for every rank, so a rank that raised (a peer died or hangs)
    could never exit while its peer is stopped."""
    try:
        import mpi4py

        mpi4py.rc.initialize = mpi4py.rc.finalize = False  # this function initialises and finalises
        from mpi4py import MPI
    except ImportError as exc:
        raise RankDiscoveryError(
            "sharing rank 0's address under mpirun needs mpi4py: pip install 'compact-hooks[mpi]', "
            "or set MASTER_ADDR and MASTER_PORT (mpirun -x MASTER_ADDR=... -x MASTER_PORT=...)") from exc
    ours = not MPI.Is_initialized()
    if ours:
        MPI.Init()
    try:
        return MPI.COMM_WORLD.bcast(value, root=0)
    finally:
        if ours and not MPI.Is_finalized():
            MPI.Finalize()


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0, *,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None,
                     ifname: Optional[str] = None):
    """Discover the ranks, :func:`apply` them and initialise torch.distributed; returns the world group.

    ``backend`` defaults to ``nccl`` when CUDA is available (the device is set to the local rank),
    else ``gloo``. If torch.distributed is already initialised, checks the world size and returns.
    Call this first in any script started by ``mpirun`` (DeepSpeed's ``init_distributed`` then finds
    the variables set and skips its own discovery).
    """
    import datetime

    import torch
    import torch.distributed as dist

    info = discover(os.environ, master_addr=master_addr, master_port=master_port, ifname=ifname,
                    broadcast=mpi_broadcast)
    apply(info)
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
            raise RankDiscoveryError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()} "
                f"but the launcher says rank {info.rank} of {info.world_size}")
        return dist.group.WORLD
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD
