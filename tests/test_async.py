"""The async API (issue 21 item 1): ``hook.start(call)`` / ``hook(call, async_op=True)`` return a
:class:`compact_hooks.CollectiveWork` (``wait()``, ``is_completed()``, ``get_future()``).

* parity: every hook kind, op, codec and residual mode gives the same bytes, bases and byte counts
  as the synchronous call, with several works outstanding and waited in reverse order (2 and 3 ranks);
* the ordering rule: a second call on an outstanding key, and a step or request mark with outstanding
  works, raise OutstandingWorkError and change nothing;
* overlap: the transfer runs while the caller computes (a delayed peer);
* a dead or hung peer during an outstanding exchange: CollectiveTimeoutError at ``wait()``;
* the work type itself (no process group): decode once, futures, chaining, errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks.hook import CollectiveCall, CommHook
from tests import async_workers as W
from tests.distributed import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]


# -- the work type, in one process ---------------------------------------------------------------


class Stage:
    """A wire stage whose completion the test controls (the work is the thing under test)."""

    def __init__(self) -> None:
        self.done = False
        self.waits = 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        self.waits += 1
        self.done = True


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["wait", "future", "then", "completed", "thread"]), min_size=1, max_size=8),
       st.booleans())
def test_work_decodes_once_whatever_the_callers_do(actions, fail):
    stage, decodes = Stage(), []

    def finish() -> torch.Tensor:
        decodes.append(1)
        if fail:
            raise ch.CollectiveTimeoutError("peer gone")
        return torch.ones(3)

    work = ch.CollectiveWork([stage], finish)
    assert not work.is_completed()
    results = []
    for action in actions:
        try:
            if action == "wait":
                results.append(work.wait())
            elif action == "future":
                results.append(work.get_future().wait())
            elif action == "then":
                results.append(work.get_future().then(lambda f: f.value()).wait())
            elif action == "completed":
                work.is_completed()
            else:
                box: list = []
                t = threading.Thread(target=lambda: box.append(work.wait_quietly()))
                t.start()
                t.join()
        except ch.CollectiveTimeoutError as exc:
            results.append(exc)
    work.wait_quietly()
    assert len(decodes) == 1 and stage.waits == 1 and work.is_completed()
    assert all(r is results[0] for r in results)
    assert work.get_future().done()
    if fail:
        with pytest.raises(ch.CollectiveTimeoutError):
            work.wait()
    else:
        assert work.wait() is work.get_future().value()


def test_completed_work_and_sync_hooks_without_a_group():
    x = torch.randn(4, 3)
    work = ch.CollectiveWork.completed(x)
    assert work.is_completed() and work.wait() is x and work.get_future().wait() is x
    for hook in [ch.PassthroughHook(), ch.CastHook(), ch.build_hook({"compressor": "int2"}), ch.StaleHook()]:
        w = hook(CollectiveCall("all_gather", x), async_op=True)
        assert isinstance(w, ch.CollectiveWork) and w.wait() is x
        assert hook.start(CollectiveCall("all_to_all", x)).wait() is x


def test_a_synchronous_subclass_accepts_async_op_and_a_bare_one_says_what_to_implement():
    class Twice(CommHook):
        def __call__(self, call: CollectiveCall) -> torch.Tensor:
            return call.tensor * 2

    x = torch.ones(2)
    assert torch.equal(Twice()(CollectiveCall("all_reduce", x), async_op=True).wait(), x * 2)
    assert torch.equal(Twice().start(CollectiveCall("all_reduce", x)).wait(), x * 2)

    class Bare(CommHook):
        pass

    with pytest.raises(NotImplementedError, match="start"):
        Bare()(CollectiveCall("all_reduce", x))


# -- real process groups -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def parity(request):
    return request.param, run_ranks(W.parity_worker, request.param)


def test_async_equals_sync_for_every_hook_op_codec_and_mode(parity):
    world, results = parity
    for rank, res in enumerate(results):
        assert not res["problems"], f"P={world} rank {rank}:\n" + "\n".join(res["problems"][:20])
        assert res["compared"] == len(W.hook_factories()) * 2 * W.STEPS * 7


@pytest.fixture(scope="module")
def ordering():
    return run_ranks(W.ordering_worker, 2)


def test_one_outstanding_call_per_key_and_none_at_step_marks(ordering):
    for rank, res in enumerate(ordering):
        assert not res["problems"], f"rank {rank}:\n" + "\n".join(res["problems"])
        second, at_step = res["messages"]["int2/ef"]
        assert "'k' already has an outstanding async call" in second and "wait()" in second
        assert "next_step() with outstanding async calls on 'k', 'r'" in at_step


def test_transfer_runs_while_the_caller_computes(tmp_path):
    delay = 1.5
    records = run_ranks(W.overlap_worker, 2, delay, str(tmp_path))
    for mine, peer in zip(records[0], records[1]):
        where = f"{mine['hook']} {mine['op']}"
        assert mine["equal"] and peer["equal"], where
        # start() returned before the peer even began its side: it did not wait for the transfer
        assert mine["start_returned"] < peer["peer_started"], where
        assert mine["completed_after_start"] is False, where
        if mine["op"] != "ring_exchange":  # gloo's point-to-point works say so only in wait()
            # the transfer finished in the background, seen by polling, before any wait()
            assert mine["completed_before_wait"] is True, where
            assert mine["seen_completed"] >= peer["peer_started"], where
        if mine["op"] != "all_reduce":  # its second stage starts in wait()
            # the peer got this rank's bytes and finished while this rank was still computing
            assert peer["peer_done"] < mine["wait_called"], where


TIMEOUT_S = 4.0
HARD_LIMIT_S = 120.0


def run_job(*args: str) -> tuple[list[int], str]:
    """Two rank processes of the dead-peer job started directly (no launcher that could stop the
    survivor before it reports); returns their exit codes and their stderr together."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "async_workers.py"), *args], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(2)]
    outputs = ["", ""]
    try:
        outputs[0] = "".join(procs[0].communicate(timeout=HARD_LIMIT_S))  # the survivor; then the victim goes
    finally:
        for r, proc in enumerate(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if not outputs[r]:
                outputs[r] = "".join(part or "" for part in proc.communicate())
    return [proc.returncode for proc in procs], "".join(outputs)


@pytest.mark.reliability
@pytest.mark.parametrize("mode", ["kill", "hang"])
@pytest.mark.parametrize("op", ["all_to_all", "ring_exchange"])
def test_dead_peer_during_an_outstanding_exchange(mode, op):
    """Rank 0 has an exchange outstanding (start() returned at once) when rank 1 dies or hangs
    before its side: rank 0's wait() raises CollectiveTimeoutError, within timeout_s of start()."""
    codes, out = run_job("--mode", mode, "--timeout-s", str(TIMEOUT_S), "--op", op)
    lines = [line for line in out.splitlines() if line.startswith("@@FAILED rank=0 ")]
    assert codes[0] == 3 and len(lines) == 1, (codes, out[-3000:])
    fields = dict(tok.split("=", 1) for tok in lines[0].split()[1:4])
    msg = lines[0].split(" ", 4)[4]
    assert msg.startswith("CollectiveTimeoutError: "), msg
    assert float(fields["start"]) < 1.0  # start() did not wait for the dead peer
    after = float(fields["after"])
    if mode == "hang":
        assert TIMEOUT_S - 0.5 <= after <= TIMEOUT_S + 2.0, after
        assert f"did not complete within timeout_s={TIMEOUT_S}" in msg
    else:
        assert after <= TIMEOUT_S + 2.0, after
        assert "died" in msg
