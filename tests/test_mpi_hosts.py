"""Compressed collectives across emulated hosts (network namespaces), launched with mpirun.

Hypothesis draws the world size, codec, residual mode, shape and dtype; mpirun runs
``mpi_worker.py serve`` with one rank per emulated host, each rank finding the others through
``compact_hooks.launcher.mpi.init_distributed()`` (rank 0's address on ``eth1`` shared over MPI).
One mpirun per world size serves all examples (a fresh one per example would cost seconds); the
workers check their results and report JSON that the test asserts on.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from compact_hooks.launcher import netns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

Hosts, NetnsUnavailable, emulated_hosts = netns.Hosts, netns.NetnsUnavailable, netns.emulated_hosts

pytestmark = pytest.mark.multinode

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
REPO = HERE.parent
MARK = "@@RESULT "
START_TIMEOUT_S = 90.0
CASE_TIMEOUT_S = 60.0

CODECS: list[Any] = [
    "none", "fp16", "bf16", "int8", {"name": "int4", "group_size": 32}, "int2", "int1", "int2cf",
    {"name": "topk", "ratio": 0.25}, {"name": "nm", "n": 2, "m": 4}, {"name": "lowrank", "rank": 4},
]
MODES = ["none", "delta", "ef", "ef2"]
OPS = ["all_gather", "all_to_all", "all_reduce"]


class WorkerPool:
    """One ``mpirun ... mpi_worker.py serve`` across the first ``size`` hosts; ``run(case)`` per example."""

    def __init__(self, hosts: Hosts, size: int) -> None:
        self.size = size
        self.stderr = tempfile.TemporaryFile(mode="w+")
        argv = [netns.mpirun_path(), *hosts.mpirun_args(), "--bind-to", "none", "-np", str(size),
                "--hostfile", str(hosts.hostfile_for(size)), "-x", f"GLOO_SOCKET_IFNAME={hosts.ifname}",
                sys.executable, "-u", str(WORKER), "serve", "--timeout", str(CASE_TIMEOUT_S)]
        self.proc = hosts.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                text=True, bufsize=1, cwd=REPO)
        self.buffer = ""
        self.served = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def _read_result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while "\n" in self.buffer:
                line, self.buffer = self.buffer.split("\n", 1)
                if line.startswith(MARK):
                    return json.loads(line[len(MARK):])
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"no result within {timeout:.0f} s; worker log:\n{self.log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536).decode(errors="replace")
                if not chunk:
                    self.proc.wait(timeout=30)
                    raise AssertionError(f"the workers exited (code {self.proc.returncode}); log:\n{self.log()}")
                self.buffer += chunk

    def run(self, case: dict[str, Any]) -> list[dict[str, Any]]:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        result = self._read_result(CASE_TIMEOUT_S + (0.0 if self.served else START_TIMEOUT_S))
        self.served = True
        return result["ranks"]

    def close(self, timeout: float = 60.0) -> Optional[int]:
        """Ask the workers to finish; returns mpirun's exit code (None if it had to be killed)."""
        if self.alive():
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                return self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        netns.kill_group(self.proc)
        self.proc.wait(timeout=30)


class Pools:
    """A worker pool per world size, restarted after a failure."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.pools: dict[int, WorkerPool] = {}

    def get(self, size: int) -> WorkerPool:
        pool = self.pools.get(size)
        if pool is None or not pool.alive():
            pool = self.pools[size] = WorkerPool(self.hosts, size)
        return pool

    def close(self) -> dict[int, Optional[int]]:
        codes = {size: pool.close() for size, pool in self.pools.items()}
        self.pools.clear()
        return codes


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    try:
        with emulated_hosts(3) as h:
            yield h
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pools(hosts: Hosts) -> Iterator[Pools]:
    p = Pools(hosts)
    yield p
    p.close()


def check(results: list[dict[str, Any]], size: int, residual: str) -> None:
    errors = [f"rank {r['rank']}:\n{r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    problems = [f"rank {r['rank']}: {p}" for r in results for p in r["problems"]]
    assert not problems, "\n".join(problems)
    names = [r["hostname"] for r in results]
    assert len(set(names)) == size, f"ranks should run on {size} different hosts: {names}"
    holders: dict[str, dict[int, str]] = {}
    for r in results:
        for stream, digest in r["digests"].items():
            holders.setdefault(stream, {})[r["rank"]] = digest
    for stream, by_rank in holders.items():
        assert len(set(by_rank.values())) == 1, f"ranks hold different bases of {stream}: {by_rank}"
        if stream.endswith("->*"):  # an all-gathered stream is held by every rank
            assert len(by_rank) == size, f"{stream} is held by ranks {sorted(by_rank)} only"
    # a lossless codec, or payloads not smaller than plain (tiny shapes), take the plain path
    if residual != "none" and not results[0]["lossless"] and results[0]["compressed_ops"]:
        assert any(len(v) >= 2 for v in holders.values()), "no stream's base was compared across ranks"
    assert len({r["wire_bytes"] for r in results}) == 1, "ranks disagree on the wire bytes of one symmetric job"


shapes = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 40)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 24)),
)


@pytest.mark.parametrize("compressor", CODECS, ids=lambda c: c if isinstance(c, str) else c["name"])
@settings(derandomize=True, deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([2, 3]), residual=st.sampled_from(MODES), shape=shapes,
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]), steps=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_compressed_collectives_across_hosts(pools: Pools, compressor: Any, size: int, residual: str,
                                             shape: tuple[int, ...], dtype: str, steps: int, seed: int) -> None:
    case = {"compressor": compressor, "residual": residual, "shape": list(shape), "dtype": dtype,
            "steps": steps, "warmup_steps": 1, "ops": OPS, "seed": seed}
    pool = pools.get(size)
    results = pool.run(case)
    check(results, size, residual)


def test_workers_exit_cleanly(pools: Pools) -> None:
    """Every pool the property test started ends with exit code 0 on all ranks."""
    for size in (2, 3):
        pools.get(size)
    codes = pools.close()
    assert codes == {2: 0, 3: 0}, f"mpirun exit codes per world size: {codes}"


def _launch(hosts: Hosts, n: int, *worker_args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "compact_hooks.cli", "launch", "--launcher", "mpirun",
            "--hostfile", str(hosts.hostfile_for(n)), "--ifname", hosts.ifname,
            "--launcher-args", f"--prtemca plm_ssh_agent {hosts.agent}",
            "--", "python", str(WORKER), "hello", *worker_args]
    return hosts.run(argv, timeout=START_TIMEOUT_S + 30, cwd=REPO)


def _result(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, out
    return json.loads(lines[0][len(MARK):])


def test_launch_mpirun_runs_on_two_hosts(hosts: Hosts) -> None:
    done = _launch(hosts, 2)
    assert done.returncode == 0, done.stderr[-4000:]
    result = _result(done.stdout)
    assert result["world_size"] == 2
    assert len(set(result["hostnames"])) == 2, result
    assert result["hostnames"] == list(hosts.names[:2])
    assert result["master_addr"] == hosts.addresses[0]  # rank 0's eth1, not a guess


def test_launch_mpirun_propagates_a_failing_rank_exit_code(hosts: Hosts) -> None:
    done = _launch(hosts, 2, "--exit-code", "7", "--fail-rank", "1")
    assert done.returncode == 7, done.stderr[-4000:]


def test_emulated_hosts_clean_up_after_a_failure_and_a_crash() -> None:
    try:
        netns.check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    # a crashed run: namespace named after a pid that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}-{dead.pid}-abc123-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with pytest.raises(RuntimeError, match="boom"):
        with emulated_hosts(2, rate="100mbit") as h:
            assert stale not in netns._namespaces()  # removed on start
            names = set(h.names)
            assert names <= set(netns._namespaces())
            done = h.run(["tc", "qdisc", "show", "dev", h.ifname], host=1, timeout=30)
            assert "tbf" in done.stdout and "100Mbit" in done.stdout
            raise RuntimeError("boom")
    assert not names & set(netns._namespaces())
    assert not h.workdir.exists()
