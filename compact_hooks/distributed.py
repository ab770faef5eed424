"""``init_distributed``: torch.distributed from whatever launched this process, and a sane number of
CPU threads per rank.

One call works under every launcher the project supports::

    import compact_hooks as ch
    world = ch.init_distributed()   # torchrun, deepspeed, mpirun (Open MPI, MPICH), srun (Slurm)

The launcher's variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``OMPI_COMM_WORLD_*``; ``PMI_*``;
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/...) are read by
:func:`compact_hooks.launcher.mpi.discover`, written back as ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (so DeepSpeed sees the same world), and the
process group is created (``nccl`` with CUDA, else ``gloo``). A process started without a launcher gets
:class:`~compact_hooks.launcher.mpi.RankDiscoveryError` naming the launch commands.

On CPU, ranks sharing a host would each start one thread per core (torchrun sets ``OMP_NUM_THREADS=1``
for its workers; the deepspeed launcher and mpirun do not), which oversubscribes the cores many times
over. Unless ``OMP_NUM_THREADS`` is set, :func:`init_distributed` gives each rank
``cores // local_world_size`` threads (:func:`set_rank_threads`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

LOG = logging.getLogger("compact_hooks")


def host_cores() -> int:
    """The processors this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def local_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Ranks on this host, from the launcher's variables (1 when none says)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                 "SLURM_NTASKS_PER_NODE"):
        raw = environ.get(name, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return 1


def rank_threads(local_size: int, cores: Optional[int] = None) -> int:
    """Threads per rank when ``local_size`` ranks share ``cores`` processors: ``max(1, cores // local_size)``."""
    if local_size < 1:
        raise ValueError(f"local_size must be >= 1; got {local_size}")
    return max(1, (cores if cores is not None else host_cores()) // local_size)


def set_rank_threads(local_size: Optional[int] = None, environ: Mapping[str, str] = os.environ,
                     announce: bool = False) -> Optional[int]:
    """``torch.set_num_threads(cores // local_size)`` unless ``OMP_NUM_THREADS`` is set; returns the
    count set (``None``: the variable was set and is left to rule). ``local_size`` defaults to
    :func:`local_world_size`; ``announce`` logs one line (on local rank 0) saying what was set."""
    import torch

    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    local_size = local_size if local_size is not None else local_world_size(environ)
    n = rank_threads(local_size)
    torch.set_num_threads(n)
    if announce and environ.get("LOCAL_RANK", "0").strip() in ("0", ""):
        LOG.warning("compact_hooks: OMP_NUM_THREADS is unset: %d CPU thread(s) per rank (%d cores, %d ranks "
                    "on this host); set OMP_NUM_THREADS to choose", n, host_cores(), local_size)
    return n


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0, *,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None,
                     ifname: Optional[str] = None, threads: bool = True) -> Any:
    """Initialise torch.distributed under torchrun, deepspeed, mpirun or Slurm; returns the world group.

    ``backend`` defaults to ``nccl`` when CUDA is available (the device is set to the local rank),
    else ``gloo``. ``master_addr`` / ``master_port`` / ``ifname`` override what the launcher says
    (see docs/multinode.md). An already initialised torch.distributed is returned as it is. With
    ``threads`` (default) and a gloo backend, each rank gets ``cores // ranks on this host`` CPU threads
    unless ``OMP_NUM_THREADS`` is set (logged once per host). Without a launcher it raises
    :class:`~compact_hooks.launcher.mpi.RankDiscoveryError` naming the launch commands.
    """
    import torch.distributed as dist

    from compact_hooks.launcher import mpi

    if dist.is_initialized():
        return dist.group.WORLD
    world = mpi.init_distributed(backend, timeout_s, master_addr=master_addr, master_port=master_port,
                                 ifname=ifname)
    if threads and dist.get_backend() == "gloo":
        set_rank_threads(announce=True)
    return world
