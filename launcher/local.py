"""Run a function on several local processes joined by a gloo process group (tests, benchmarks)."""

from __future__ import annotations

import os
import pickle
import random
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports handed out by ``bind(0)`` and outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(attempts: int = 200) -> int:
    """A TCP port free on 127.0.0.1, drawn at random from *below* the ephemeral range.

    ``bind(0)`` returns an ephemeral port, which the kernel may hand to any outgoing connection (gloo
    opens many) between this call and the launcher's own bind: an ``EADDRINUSE`` race. A port outside
    that range is only taken by someone who names it, and a random draw makes two pickers unlikely to
    collide.
    """
    low, _ = _ephemeral_range()
    candidates = range(max(1024, low - 12000), max(1025, low - 1))
    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {candidates.start}-{candidates.stop - 1} after {attempts} tries")


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # ranks share the machine's cores
    result: Any
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which raises
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    # The result is on disk: leave without interpreter teardown. With torch 2.13 + gloo, about one
    # run in ten aborted there ("terminate called without an active exception", SIGABRT) after the
    # process group was destroyed and the result written; that abort is not the code under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results.

    ``fn`` must be importable (module level). A failing rank raises ``RuntimeError`` here.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                           join=True, start_method="spawn")
        results = [pickle.loads(Path(out_dir, f"{r}.pkl").read_bytes()) for r in range(world_size)]
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [r[1] for r in results]
