"""The jobs of ``compact-hooks bench e2e``: one mpirun of a rank program across emulated hosts per link
rate (:func:`run_rate`), step-time helpers and the CLI report shared by the ulysses, ``--mode usp``
and ``--mode ring`` drivers (:mod:`compact_hooks.bench.e2e`, ``e2e_usp``, ``e2e_ring``)."""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from .e2e_setup import PROGRESS

__all__ = ["report", "run_rate"]

# ---- one rate: an mpirun across emulated hosts --------------------------------------------------


def _worker_argv(hosts: Any, n: int, per_host: int, module: str, args: list[str]) -> list[str]:
    from compact_hooks.launcher import netns

    return [netns.mpirun_path(), *hosts.mpirun_args(), "--bind-to", "none", *hosts.mpirun_ranks(n, per_host),
            "-x", f"GLOO_SOCKET_IFNAME={hosts.ifname}", "-x", "OMP_NUM_THREADS=1", "-x", "MKL_NUM_THREADS=1",
            sys.executable, "-u", "-m", module, *args]


def _pump(proc: subprocess.Popen, timeout: float, echo: bool, job: str = "the bench job") -> str:
    """Read the job's output until it exits; echo progress lines; return the last lines. Kills the job
    (and raises) after ``timeout`` seconds."""
    from compact_hooks.launcher import netns

    tail: deque[str] = deque(maxlen=60)
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                netns.kill_group(proc)
                proc.wait(timeout=30)
                raise TimeoutError(f"{job} did not finish within {timeout:.0f} s (raise --timeout); "
                                   f"last output:\n" + "\n".join(tail))
            if not sel.select(timeout=min(left, 5.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                if echo and line.startswith(PROGRESS):
                    print(line, file=sys.stderr, flush=True)
    proc.wait()
    return "\n".join(tail)


def run_rate(rate: str, n_hosts: int, worker_args: list[str], timeout: float, echo: bool,
             burst: Optional[int] = None, per_host: int = 1, module: str = "compact_hooks.bench.e2e_worker",
             what: str = "bench") -> dict[str, Any]:
    """Create ``n_hosts`` emulated hosts capped at ``rate`` (tbf bucket of ``burst`` bytes, default
    ``netns.auto_burst``), run the rank program ``module`` on them (``per_host`` ranks each), return
    its JSON. The one launcher of ``bench e2e``'s modes (ulysses, ``--mode usp``, ``--mode ring``)."""
    from compact_hooks.launcher.netns import emulated_hosts, kill_group

    job = f"the {what} job at {rate}"
    with emulated_hosts(n_hosts, rate=rate, burst=burst) as hosts:
        result_path = hosts.workdir / "result.json"
        argv = _worker_argv(hosts, n_hosts, per_host, module, [*worker_args, "--rate", rate, "--result", str(result_path)])
        proc = hosts.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(hosts.workdir))
        try:
            log = _pump(proc, timeout, echo, job)
        finally:
            if proc.poll() is None:
                kill_group(proc)
                proc.wait(timeout=30)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"{job} failed (mpirun exit code {proc.returncode}); last output:\n{log}")
        result = json.loads(result_path.read_text())
        result["tbf_burst_bytes"] = hosts.burst
        return result


# ---- step times ------------------------------------------------------------------------------------


def _steps_s(step_end_s: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *step_end_s], step_end_s)]


def _steady(step_end_s: list[float]) -> Optional[float]:
    """Median time of the steps after the first (the warm-up step sends full tensors)."""
    steps = _steps_s(step_end_s)[1:]
    return statistics.median(steps) if steps else None


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ---- the CLI's output --------------------------------------------------------------------------------


def report(args: argparse.Namespace, run: Callable[[], dict[str, Any]], fmt: Callable[[dict[str, Any]], str],
           also: Optional[Callable[[dict[str, Any]], None]] = None) -> int:
    """Run a ``bench e2e`` mode and print its result (``--out``, ``--json``); the exit code (2: setup)."""
    from compact_hooks.launcher.netns import NetnsUnavailable

    try:
        result = run()
    except (NetnsUnavailable, ValueError, FileNotFoundError) as exc:  # setup: what to change
        print(f"compact-hooks bench e2e: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:  # a failed job: its message holds the log's tail
        print(f"compact-hooks bench e2e: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if also is not None:
        also(result)
    print(text if args.json else fmt(result))
    return 0
