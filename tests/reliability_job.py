"""Rank program of the dead-rank reliability tests; start it with torchrun, deepspeed or mpirun.

``python reliability_job.py --victim R --at-step S [--at-op OP] --timeout-s T [--hang] [--mpi] [--hook H]``

Every rank runs steps of all four collectives through one hook (``--hook``: a :class:`CompactHook`
by default, or the plain, cast or stale hook). At
step ``S``, before collective ``OP`` (default all_to_all), rank ``R`` kills itself with SIGKILL
(``--hang``: it sleeps forever instead, a hung rank). A survivor that gets a compact-hooks error prints
``@@FAILED rank=<r> after=<seconds since its step began> t=<time> <ExceptionName>: <message>`` on stderr
and re-raises (a traceback and a non-zero exit). The process group's own timeout is long (600 s),
as in a real job: only ``timeout_s`` of the ``"compact_hooks"`` block may bound the wait.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import compact_hooks as ch

OPS = ("all_gather", "all_to_all", "all_reduce", "ring_exchange")


def init(use_mpi: bool) -> None:
    """torch.distributed from the launcher's variables (MPI's through compact_hooks.launcher.mpi)."""
    if use_mpi:
        from compact_hooks.launcher.mpi import init_distributed

        init_distributed(backend="gloo", timeout_s=600.0)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=600))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--at-step", type=int, default=3)
    parser.add_argument("--at-op", choices=OPS, default="all_to_all", help="the victim stops before this op")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--mpi", action="store_true")
    parser.add_argument("--hook", choices=("compact", "passthrough", "cast", "stale"), default="compact",
                        help="which hook's path to test (all honour timeout_s)")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher appends it
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init(args.mpi)
    rank, world = dist.get_rank(), dist.get_world_size()
    hook = ch.build_hook({"hook": args.hook, "compressor": "int2", "timeout_s": args.timeout_s})
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4 * world, 64, generator=g)
    print(f"@@READY rank={rank} world={world}", flush=True)
    for step in range(args.steps):
        started = time.monotonic()
        try:
            for op in OPS:
                if rank == args.victim and step == args.at_step and op == args.at_op:  # mid-request, mid-step
                    print(f"@@VICTIM rank={rank} step={step} t={time.time():.3f}", flush=True)
                    if args.hang:
                        time.sleep(3600)
                    os.kill(os.getpid(), signal.SIGKILL)
                hook(ch.CollectiveCall(op, x + 0.01 * step, None, key=op))
        except ch.CompactHooksError as exc:
            line = (f"@@FAILED rank={rank} after={time.monotonic() - started:.2f} t={time.time():.3f} "
                    f"{type(exc).__name__}: {exc}".replace("\n", " "))
            os.write(2, (line[:3000] + "\n").encode())  # one write: ranks share the launcher's stderr
            raise
        hook.next_step()
    print(f"@@DONE rank={rank}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
