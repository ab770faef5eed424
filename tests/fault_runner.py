"""Drives ``tests/fault_job.py`` under mpirun across emulated hosts and reads its JSON lines
(used by ``tests/test_faults_under_load.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from compact_hooks.launcher import netns

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "fault_job.py"


class FaultJob:
    """One mpirun of the fault job, one rank per emulated host, in its own process group.

    ``mpi_discovery=False`` passes rank 0's address and a port in ``MASTER_ADDR`` / ``MASTER_PORT``
    (mpi4py is then never imported); ``True`` lets ``init_distributed`` share them over MPI."""

    _jobs = 0

    def __init__(self, hosts: netns.Hosts, name: str, *job_args: str, ranks: int = 2,
                 mpi_discovery: bool = False) -> None:
        self.ranks = ranks
        self.results = hosts.workdir / name
        self.results.mkdir()
        self.log = tempfile.TemporaryFile(mode="w+")
        FaultJob._jobs += 1
        master = [] if mpi_discovery else [
            "-x", f"MASTER_ADDR={hosts.addresses[0]}", "-x", f"MASTER_PORT={29600 + FaultJob._jobs}"]
        argv = [netns.mpirun_path(), *hosts.mpirun_args(), "--bind-to", "none", "-np", str(ranks),
                "--hostfile", str(hosts.hostfile_for(ranks)), "-x", f"GLOO_SOCKET_IFNAME={hosts.ifname}",
                "-x", "OMP_NUM_THREADS=1", *master, sys.executable, "-u", str(JOB), "--results", str(self.results),
                *job_args]
        self.started = time.monotonic()
        self.proc = hosts.popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def events(self, rank: int, kind: Optional[str] = None) -> list[dict[str, Any]]:
        path = self.results / f"rank{rank}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        if lines and not path.read_text().endswith("\n"):
            lines = lines[:-1]  # a line being written
        out = [json.loads(line) for line in lines if line]
        return [e for e in out if kind is None or e["event"] == kind]

    def requests(self, rank: int) -> list[dict[str, Any]]:
        return self.events(rank, "request")

    def done_everywhere(self) -> int:
        """Requests every rank has completed."""
        return min(len(self.requests(r)) for r in range(self.ranks))

    def pid(self, rank: int) -> int:
        ready = self.events(rank, "ready")
        if not ready:
            raise AssertionError(f"rank {rank} never reported ready; log:\n{self.output()}")
        return int(ready[0]["pid"])

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
        """Poll ``predicate`` until true; returns ``time.time()`` then. Fails if the job exits or
        ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.time()
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) before {what}; log:\n{self.output()}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"not {what} within {timeout:.0f} s; log:\n{self.output()}")

    def wait_requests(self, n: int, timeout: float) -> float:
        return self.wait_until(f"{n} requests were done", lambda: self.done_everywhere() >= n, timeout)

    def finish(self, timeout: float) -> Optional[int]:
        """The job's exit code, or None when it had to be killed after ``timeout`` seconds (a hang)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        netns.kill_group(self.proc)
        self.proc.wait(timeout=30)

    def output(self, tail: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-tail:]
