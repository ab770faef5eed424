"""Reliability, issue 14 item 5: faults under load across emulated hosts.

A 2-host job (``tests/fault_job.py`` under mpirun, one rank per network namespace, links capped at
``RATE`` by tbf) serves ``REQUESTS`` requests of a tiny FLUX transformer made Ulysses parallel by
``parallelize`` with an int2 / error-feedback ``CompactHook`` (``timeout_s=TIMEOUT_S``). Faults
(``compact_hooks.launcher.netns_faults``) hit it after ``FAULT_AFTER`` requests:

(a) one host's link rate drops 10x, (b) the switch drops packets for a while (tbf with a tiny
queue: no iptables binary here), (c) one rank is paused (SIGSTOP) shorter, then longer than
``timeout_s``.

Every completed request is checked twice: its outputs equal, bit for bit, those of the request
with the same seed served before any fault (the compressed computation is deterministic, a fault
may only delay it), and its relative L2 error against the uncompressed single-process reference
is within the normal bound: ``BOUND_MARGIN`` x the largest error of the fault-free requests of the
same job (and below the absolute ``MAX_NORMAL_ERROR``). A job that fails must fail with
``CollectiveTimeoutError`` within ``timeout_s`` + ``SLACK_S`` of the stall.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from compact_hooks.launcher import netns
from compact_hooks.launcher import netns_faults as faults

from tests.fault_runner import FaultJob

pytestmark = [pytest.mark.reliability, pytest.mark.multinode]

RATE, SLOW = "8mbit", "800kbit"
SLOW_REQUESTS = 12  # requests served at the slow rate
REQUESTS, SEEDS, FAULT_AFTER = 60, 10, 15
TIMEOUT_S = 5.0
SLACK_S = 3.0  # detection: the step's local compute before the wait, the log write, a loaded machine
TEARDOWN_S = 10.0  # mpirun noticing a failed rank and stopping the job (4-6 s measured)
START_S = 150.0  # mpirun across namespaces + importing torch and diffusers on 2 busy cores
BOUND_MARGIN, MAX_NORMAL_ERROR = 1.5, 0.05
LOSS_S = 4.0  # the loss burst
BLACKOUT_S = TIMEOUT_S + 5.0  # every packet dropped: longer than timeout_s
SHORT_PAUSES_S = (1.0, 3.0)  # SIGSTOP of rank 1, each below timeout_s
STOP_AT = 30  # the request in which rank 1 stops for good
JOB_ARGS = ("--requests", str(REQUESTS), "--seeds", str(SEEDS), "--timeout-s", str(TIMEOUT_S))
# The loss job serves until the blackout ends it: a fast job (Q, K and V in one all-to-all, an idle
# machine: 60 requests in under 10 s) would otherwise finish during the burst and exit 0.
LOSS_JOB_ARGS = ("--requests", "1000000", "--seeds", str(SEEDS), "--timeout-s", str(TIMEOUT_S))


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.Hosts]:
    try:
        with netns.emulated_hosts(2, rate=RATE) as h:
            yield h
    except netns.NetnsUnavailable as exc:
        pytest.skip(str(exc))


def check_requests(job: FaultJob, expected: Optional[int] = None) -> dict[str, Any]:
    """Every completed request on every rank is right (see the module docstring); returns numbers."""
    fault_free: dict[int, str] = {}
    errors: list[float] = []
    per_rank = {}
    for rank in range(job.ranks):
        reqs = job.requests(rank)
        per_rank[rank] = len(reqs)
        assert [r["request"] for r in reqs] == list(range(len(reqs))), f"rank {rank} skipped a request"
        for r in reqs[:FAULT_AFTER]:
            assert fault_free.setdefault(r["seed"], r["digest"]) == r["digest"], f"fault-free twins differ: {r}"
        errors += [r["err"] for r in reqs]
    assert len(fault_free) == SEEDS, f"only {len(fault_free)} seeds served before the fault"
    base = [r["err"] for rank in range(job.ranks) for r in job.requests(rank)[:FAULT_AFTER]]
    bound = BOUND_MARGIN * max(base)
    assert bound < MAX_NORMAL_ERROR, f"the fault-free error {max(base):.3g} is not a normal int2 error"
    for rank in range(job.ranks):
        for r in job.requests(rank):
            assert r["digest"] == fault_free[r["seed"]], (
                f"rank {rank} request {r['request']}: output differs from its fault-free twin (err {r['err']:.3g})")
            assert r["err"] <= bound, f"rank {rank} request {r['request']}: error {r['err']:.3g} > bound {bound:.3g}"
    if expected is not None:
        assert per_rank == dict.fromkeys(range(job.ranks), expected), f"requests completed per rank: {per_rank}"
    return {"completed": per_rank, "max_err": max(errors), "bound": bound}


def seconds(job: FaultJob, first: int, last: int) -> list[float]:
    return [r["seconds"] for r in job.requests(0)[first:last]]


def report(scenario: str, **numbers: Any) -> None:
    print(f"@@FAULTS {scenario} " + " ".join(f"{k}={v}" for k, v in numbers.items()))


def test_link_rate_drops_10x_mid_run(hosts: netns.Hosts) -> None:
    """(a) every request completes, slower, with outputs identical to the fault-free ones."""
    job = FaultJob(hosts, "rate", *JOB_ARGS)
    try:
        job.wait_requests(FAULT_AFTER, START_S)
        with faults.link_rate(hosts, 1, SLOW):
            job.wait_requests(FAULT_AFTER + SLOW_REQUESTS, 120)
        rc = job.finish(120)
    finally:
        job.kill()
    assert rc == 0, job.output()
    numbers = check_requests(job, REQUESTS)
    before = statistics.median(seconds(job, 2, FAULT_AFTER))
    during = statistics.median(seconds(job, FAULT_AFTER + 2, FAULT_AFTER + SLOW_REQUESTS))
    assert during > 2 * before, f"the slower link did not slow requests: median {before} s before, {during} s during"
    report("rate_drop", **numbers, request_s_median_before=before, request_s_median_during=during,
           slowest_request_s=max(seconds(job, 0, REQUESTS)))


def failures(job: FaultJob) -> list[dict[str, Any]]:
    return [e for r in range(job.ranks) for e in job.events(r, "failed")]


def check_timed_out(job: FaultJob, rc: Optional[int], stalled_at: float, what: str,
                    survivors: tuple[int, ...] = (0, 1), allowance: float = 0.0) -> float:
    """The job failed because of the stall at ``stalled_at`` (``time.time()``): non-zero exit, and each
    of ``survivors`` reported a CollectiveTimeoutError saying it timed out, within timeout_s +
    SLACK_S (+ ``allowance`` when the stall may begin later). Another rank (a paused one, resumed
    by the teardown) may report that its peer closed the connection. Returns the earliest delay."""
    assert rc is not None, f"the job hung after {what} (killed by the test):\n{job.output()}"
    assert rc != 0, f"exit code 0 after {what}"
    failed = {e["rank"]: e for e in failures(job)}
    assert set(survivors) <= set(failed), f"after {what} only ranks {sorted(failed)} reported an error:\n{job.output()}"
    for rank, e in failed.items():
        assert e["error"] == "CollectiveTimeoutError", e
        if rank in survivors:
            assert f"did not complete within timeout_s={TIMEOUT_S}" in e["message"], e["message"]
            delay = e["t"] - stalled_at
            assert delay <= TIMEOUT_S + SLACK_S + allowance, f"rank {rank} noticed {what} after {delay:.1f} s"
    assert "CollectiveTimeoutError" in job.output(40000), "no traceback in the job's output"
    return min(failed[r]["t"] for r in survivors) - stalled_at


def test_packet_loss_bursts(hosts: netns.Hosts) -> None:
    """(b) a 4 s burst of loss in the switch: TCP retransmits and requests complete unchanged (or
    the job fails with CollectiveTimeoutError in time). Then a blackout (every packet dropped) of
    ``BLACKOUT_S`` > timeout_s: the job fails with CollectiveTimeoutError within timeout_s. Never
    a wrong output, never a hang.

    parallelize's own all_gathers (input check, output gather) wait at most the hook's timeout_s
    too, so a blackout that catches a rank in one of them also fails in time."""
    job = FaultJob(hosts, "loss", *LOSS_JOB_ARGS)
    blackout: dict[str, int] = {}
    try:
        job.wait_requests(FAULT_AFTER, START_S)
        served = job.done_everywhere()
        with faults.loss_burst(hosts, limit=3000, burst=3000) as burst:
            burst_start = time.time()
            time.sleep(LOSS_S)
        after_burst = job.done_everywhere()
        served = after_burst - served
        survived = job.wait_until("requests after the burst", lambda: bool(failures(job)) or
                                  job.done_everywhere() >= after_burst + 10, 60 + TIMEOUT_S)
        if not failures(job):  # the burst was survived: black out the switch
            with faults.loss_burst(hosts, limit=1) as blackout:
                blackout_start = time.time()
                job.wait_until("a rank reported the blackout", lambda: bool(failures(job)), BLACKOUT_S)
        rc = job.finish(TEARDOWN_S + 30)
    finally:
        job.kill()
    assert burst.get("dropped", 0) > 0, f"the switch dropped no packet in the burst: {burst}"
    if blackout:
        detected = check_timed_out(job, rc, blackout_start, "a blackout of the switch")
        assert min(e["t"] for e in failures(job)) >= survived, "a rank failed during the loss burst"
    else:  # the burst itself ended the job: in time, clearly
        detected = check_timed_out(job, rc, burst_start, "a loss burst", allowance=LOSS_S)
    numbers = check_requests(job)
    report("loss_burst", **numbers, rc=rc, burst=burst, served_during_burst=served,
           slowest_request_s=max(seconds(job, 0, REQUESTS)), blackout=blackout, detected_after_s=round(detected, 2))


def test_rank_paused_shorter_then_longer_than_timeout(hosts: netns.Hosts) -> None:
    """(c) rank 1 paused by SIGSTOP for 1 s and 3 s (< timeout_s): every request completes unchanged.
    Then rank 1 stops inside a compressed all_to_all (SIGSTOP, not resumed): rank 0 raises
    CollectiveTimeoutError about timeout_s later, the job exits non-zero, and every request
    served before is right."""
    job = FaultJob(hosts, "pause", *JOB_ARGS, "--stop-rank", "1", "--stop-at-request", str(STOP_AT),
                   "--stop-where", "collective")
    pid: Optional[int] = None
    stalls = []
    try:
        job.wait_requests(FAULT_AFTER, START_S)
        pid = job.pid(1)
        for i, pause in enumerate(SHORT_PAUSES_S):
            served = job.done_everywhere()
            assert faults.pause(pid, pause), "rank 1 is gone"
            job.wait_requests(served + 2, 60)
            stalls.append(max(seconds(job, served, served + 2)))
        stop = job.wait_until("rank 1 stopped itself", lambda: bool(job.events(1, "stopping")), 120)
        rc = job.finish(TIMEOUT_S + SLACK_S + TEARDOWN_S)
    finally:
        if pid is not None:
            faults.resume(pid)
        job.kill()
    stopped_at = job.events(1, "stopping")[0]["t"]
    detected = check_timed_out(job, rc, stopped_at, "rank 1 stopped", survivors=(0,))
    assert detected >= TIMEOUT_S - 0.5, f"rank 0 gave up {detected:.2f} s after the stop, before timeout_s"
    assert "transformer_blocks.0.attn:qkv" in job.events(0, "failed")[0]["message"]
    numbers = check_requests(job)
    assert numbers["completed"][0] == STOP_AT, numbers
    for pause, stall in zip(SHORT_PAUSES_S, stalls):
        assert stall >= pause * 0.5, f"a {pause} s pause stalled a request for only {stall} s: was it paused?"
    report("pause", **numbers, rc=rc, short_pauses_s=SHORT_PAUSES_S, slowest_request_after_pause_s=stalls,
           detected_after_s=round(detected, 2), job_ended_after_s=round(time.time() - stop, 1))


def stopped_for_good(job: FaultJob, what: str) -> None:
    """Rank 1 of ``job`` stops itself and is not resumed: rank 0 must fail within timeout_s and the
    job must exit."""
    pid: Optional[int] = None
    try:
        job.wait_until("rank 1 stopped itself", lambda: bool(job.events(1, "stopping")), START_S)
        pid = job.pid(1)
        rc = job.finish(TIMEOUT_S + SLACK_S + TEARDOWN_S)
    finally:
        if pid is not None:
            faults.resume(pid)
        job.kill()
    check_timed_out(job, rc, job.events(1, "stopping")[0]["t"], what, survivors=(0,))


def test_rank_paused_between_steps_longer_than_timeout(hosts: netns.Hosts) -> None:
    """(c) rank 1 stops (SIGSTOP) between two steps, before its transformer forward: rank 0 waits in
    parallelize's input-checksum all_gather. It must fail within timeout_s like any other wait."""
    stopped_for_good(FaultJob(hosts, "pause-step", "--requests", "4", "--timeout-s", str(TIMEOUT_S), "--stop-rank",
                              "1", "--stop-at-request", "2", "--stop-where", "step"), "rank 1 stopped between steps")


def test_rank_paused_job_exits_when_mpi_shared_the_address(hosts: netns.Hosts) -> None:
    """(c) as the long pause above, with the master address shared over MPI (the default of
    ``init_distributed`` under mpirun when MASTER_ADDR is not set): the job must still exit."""
    stopped_for_good(FaultJob(hosts, "pause-mpi", "--requests", "4", "--timeout-s", str(TIMEOUT_S), "--stop-rank",
                              "1", "--stop-at-request", "2", "--stop-where", "collective", mpi_discovery=True),
                     "rank 1 stopped")
