"""Reliability, item 4: a rank dies (SIGKILL) or hangs mid-request. The survivors raise
:class:`compact_hooks.CollectiveTimeoutError` within ``timeout_s``, the job ends with a non-zero exit
code and nothing hangs, under torchrun, the deepspeed launcher and mpirun.

The process group's own timeout is 600 s in ``tests/reliability_job.py``, as in a real job, so a
hang would show as a test timeout here; only the ``"compact_hooks"`` ``timeout_s`` bounds the wait.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import free_port

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "reliability_job.py"
BIN = Path(sys.executable).parent
TIMEOUT_S = 5.0
TEARDOWN_S = 15.0  # the launcher noticing a dead child and stopping the others
HARD_LIMIT_S = 150.0


@dataclass
class Job:
    rc: int
    wall: float
    stdout: str
    stderr: str

    def marks(self, name: str) -> list[dict[str, str]]:
        """``@@NAME key=value ...`` lines of both streams as dicts (``msg``: the rest of the line)."""
        out = []
        for line in (self.stdout + self.stderr).splitlines():
            for chunk in line.split(f"@@{name} ")[1:]:  # two ranks' lines may still share one line
                tokens = chunk.split("@@", 1)[0].rstrip().split(" ")
                fields: dict[str, str] = {}
                while tokens and re.fullmatch(r"\w+=\S+", tokens[0]):
                    key, value = tokens.pop(0).split("=", 1)
                    fields[key] = value
                fields["msg"] = " ".join(tokens)
                out.append(fields)
        return out


def launch(cmd: list[str], env: dict[str, str]) -> Job:
    """Run a launcher in its own session; kill the whole session if it outlives HARD_LIMIT_S."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=HARD_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd[0]} hung for {HARD_LIMIT_S} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return Job(proc.returncode, time.monotonic() - start, stdout, stderr)


def job_args(*extra: str) -> list[str]:
    return [str(JOB), "--victim", "1", "--at-step", "3", "--timeout-s", str(TIMEOUT_S), *extra]


def check_survivors(job: Job, survivors: list[int], hang: bool, all_report: bool = True) -> None:
    """Every survivor raised CollectiveTimeoutError in time, saying why; the job failed promptly.

    ``all_report=False``: launchers that kill the whole job as soon as one rank dies (mpirun, the
    deepspeed launcher) may stop a survivor before it reports; what reported must still be right.
    """
    assert job.rc != 0, f"exit code 0 after a rank died:\n{job.stderr[-3000:]}"
    victim = job.marks("VICTIM")
    assert len(victim) == 1, job.stdout[-2000:]
    failed = {int(m["rank"]): m for m in job.marks("FAILED")}
    if all_report:
        assert sorted(failed) == survivors, f"survivors that reported: {sorted(failed)}\n{job.stderr[-3000:]}"
    else:
        assert set(failed) <= set(survivors), sorted(failed)
    for rank, m in failed.items():
        assert m["msg"].startswith("CollectiveTimeoutError: "), m["msg"]
        after = float(m["after"])
        if hang:
            assert TIMEOUT_S - 0.5 <= after <= TIMEOUT_S + 2.0, f"rank {rank} waited {after} s"
            assert f"did not complete within timeout_s={TIMEOUT_S}" in m["msg"]
        else:
            assert after <= TIMEOUT_S + 2.0, f"rank {rank} waited {after} s"
            assert "died" in m["msg"]
        assert "compact_hooks" in m["msg"] and "timeout_s" in m["msg"]
    if failed:
        assert "CollectiveTimeoutError" in job.stderr  # the traceback, too
        ended = float(victim[0]["t"]) + (TIMEOUT_S if hang else 0.0) + TEARDOWN_S
        assert max(float(m["t"]) for m in failed.values()) <= ended
    print(f"{job.rc=} wall {job.wall:.1f} s, survivors reported after "
          f"{', '.join(m['after'] for m in failed.values())} s")


def torchrun(nproc: int, *extra: str) -> Job:
    """torchrun polls its workers every 5 s here: on a loaded machine a survivor has time to see the
    dead peer and report before the agent stops it (it would, with a 0.1 s interval, at once)."""
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), "--monitor-interval", "5", *job_args(*extra)], {})


def test_torchrun_rank_killed():
    job = torchrun(3)
    check_survivors(job, [0, 2], hang=False)


@pytest.mark.parametrize("op", ["all_to_all", "ring_exchange"])  # a collective and point-to-point
def test_torchrun_rank_hangs(op):
    """A hung rank: survivors time out after timeout_s and exit (gloo itself would wait the process
    group's 600 s before letting them exit: collectives.transport_timeout)."""
    job = torchrun(3, "--hang", "--at-op", op)
    check_survivors(job, [0, 2], hang=True)
    assert job.wall < 60 + TIMEOUT_S, f"the job took {job.wall:.0f} s"


@pytest.mark.parametrize("hook, op", [("passthrough", "all_to_all"), ("passthrough", "ring_exchange"),
                                      ("cast", "all_reduce"), ("stale", "all_gather")])
def test_plain_paths_time_out_too(hook, op):
    """The plain, cast and stale hooks wait at most timeout_s for a hung peer as well."""
    job = torchrun(3, "--hang", "--at-op", op, "--hook", hook)
    check_survivors(job, [0, 2], hang=True)
    assert job.wall < 60 + TIMEOUT_S, f"the job took {job.wall:.0f} s"


@pytest.mark.skipif(not (BIN / "deepspeed").exists(), reason="deepspeed is not installed")
def test_deepspeed_launcher_rank_killed():
    job = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *job_args()],
                 {"DS_ACCELERATOR": "cpu"})
    check_survivors(job, [0], hang=False, all_report=False)


@pytest.mark.skipif(shutil.which("mpirun", path=str(BIN)) is None, reason="Open MPI's mpirun is not installed")
def test_mpirun_rank_killed():
    pytest.importorskip("compact_hooks.launcher.mpi")
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    job = launch([str(BIN / "mpirun"), "-np", "2", "--oversubscribe", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
                  "-x", "OMP_NUM_THREADS", sys.executable, *job_args("--mpi")], env)
    check_survivors(job, [0], hang=False, all_report=False)
