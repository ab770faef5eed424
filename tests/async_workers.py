"""Rank programs of tests/test_async.py: the async API (``hook.start(call)``, ``hook(call, async_op=True)``)
against the synchronous call, on real gloo process groups.

Run as a script (under torchrun) it is the dead-peer job: ``python async_workers.py --mode kill|hang
--timeout-s T``: rank 0 starts an exchange asynchronously, then rank 1 dies (SIGKILL) or hangs
before its side; rank 0's ``wait()`` must raise CollectiveTimeoutError. Rank 0 prints ``@@FAILED
rank=0 after=<seconds since start()> <Name>: <message>`` (or ``@@NOERROR``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.hook import CollectiveCall, CommHook, WrappingHook

OPS = [("all_gather", 0), ("all_gather", 1), ("all_gather", -1), ("all_to_all", 0), ("all_reduce", 0),
       ("ring_exchange", 0)]
CODECS = ["int8", "int2", "int1", "lowrank", "auto", "fp16"]
MODES = ["ef", "delta", "none"]
STEPS = 4


def configs() -> list[tuple[str, dict[str, Any]]]:
    """Every codec in every residual mode it allows (auto needs error feedback)."""
    out = []
    for codec in CODECS:
        for mode in MODES:
            if codec == "auto" and mode != "ef":
                continue
            out.append((f"{codec}/{mode}", {"compressor": codec, "residual": mode, "verify_every": 2,
                                            "stats": {"error_every": 3}, "timeout_s": 60}))
    return out


class Meter(WrappingHook):
    """A wrapper that overrides only ``__call__`` (stays synchronous) and counts its calls."""

    def __init__(self, inner: CommHook) -> None:
        super().__init__(inner)
        self.calls = 0

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        self.calls += 1
        return super().__call__(call)


def hook_factories() -> list[tuple[str, Callable[[], CommHook]]]:
    """Name and constructor of every hook kind the parity test runs (each is built twice)."""
    rules = {"compressor": "int2", "timeout_s": 60, "verify_every": 2, "rules": [
        {"match": {"key": ["plain.*"]}, "plain": True},
        {"match": {"op": "all_gather"}, "compressor": {"name": "lowrank", "rank": 4}},
        {"match": {"op": "all_to_all"}, "compressor": "int8", "warmup_compressor": "int8"}]}
    out: list[tuple[str, Callable[[], CommHook]]] = [
        (name, lambda cfg=cfg: ch.build_hook(cfg)) for name, cfg in configs()]
    out += [
        ("passthrough", lambda: ch.PassthroughHook(60)),
        ("cast", lambda: ch.CastHook(torch.bfloat16, 60)),
        ("stale", lambda: ch.StaleHook(2, timeout_s=60)),
        ("link_aware", lambda: ch.LinkAwareHook(ch.build_hook({"compressor": "int2", "timeout_s": 60}),
                                                ch.PassthroughHook(60), compress=("intra_host", "inter_host"))),
        ("rules", lambda: ch.build_hook(rules)),
        ("wrapping", lambda: WrappingHook(ch.build_hook({"compressor": "int4", "timeout_s": 60}))),
        ("wrapping_sync", lambda: Meter(ch.build_hook({"compressor": "int4", "timeout_s": 60}))),
    ]
    return out


def inputs(rank: int, world: int, step: int, op: str, request: int = 0) -> torch.Tensor:
    """A slowly changing activation per rank and op (residuals are small, as in diffusion)."""
    g = torch.Generator().manual_seed(1000 * rank + 17 * OPS.index((op, 0)) + request)
    base = torch.randn(2 * world, 16, 64, generator=g)
    drift = torch.randn(2 * world, 16, 64, generator=torch.Generator().manual_seed(rank * 7 + step + 100 * request))
    return base + 0.05 * step * drift


def sessions_of(hook: CommHook) -> list[ch.Session]:
    while isinstance(hook, WrappingHook):
        hook = hook.inner
    if isinstance(hook, ch.LinkAwareHook):
        hook = hook.compressed
    return hook.sessions() if isinstance(hook, ch.CompactHook) else []


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bytes (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def byte_totals(hook: CommHook) -> tuple[Any, Any, Any]:
    s = hook.stats()
    return s.get("raw_bytes"), s.get("wire_bytes"), s.get("resyncs")


def calls(rank: int, world: int, step: int, request: int) -> list[CollectiveCall]:
    """One call per op and dim, each on its own key; keys ``plain.*`` exercise a plain rule."""
    out = []
    for op, dim in OPS:
        key = f"blocks.{op}.{dim}" if dim != -1 else f"plain.{op}"
        out.append(CollectiveCall(op, inputs(rank, world, step, op, request), None, key=key, dim=dim))
    out.append(CollectiveCall("all_to_all", inputs(rank, world, step, "all_to_all", request) * 2))  # keyless
    return out


def parity_worker(rank: int, world: int) -> dict[str, Any]:
    """Every hook kind, op and codec: the synchronous call and start() (started in call order, waited
    in reverse order) give the same bytes, bases and byte counts, over two requests of STEPS steps."""
    problems: list[str] = []
    compared = 0
    for name, make in hook_factories():
        sync_hook, async_hook = make(), make()
        for request in range(2):
            sync_hook.begin_request()
            async_hook.begin_request()
            for step in range(STEPS):
                want = [sync_hook(c) for c in calls(rank, world, step, request)]
                cs = calls(rank, world, step, request)
                works = [async_hook.start(c) if i % 2 else async_hook(c, async_op=True) for i, c in enumerate(cs)]
                got: list[Optional[torch.Tensor]] = [None] * len(works)
                for i in reversed(range(len(works))):
                    got[i] = works[i].wait() if i % 3 else works[i].get_future().wait()
                for c, w, g in zip(cs, want, got):
                    compared += 1
                    if g is None or not same_bits(w, g):
                        problems.append(f"{name} req {request} step {step} {c.op} key {c.key}: results differ")
                sync_hook.next_step()
                async_hook.next_step()
            digests = [s.base_digests() for s in sessions_of(sync_hook)]
            if digests != [s.base_digests() for s in sessions_of(async_hook)]:
                problems.append(f"{name} req {request}: bases differ")
            if any(s.mode != "none" for s in sessions_of(sync_hook)) and not any(digests):
                problems.append(f"{name}: no bases to compare")
            if byte_totals(sync_hook) != byte_totals(async_hook):
                problems.append(f"{name}: stats differ {byte_totals(sync_hook)} vs {byte_totals(async_hook)}")
        if isinstance(sync_hook, Meter) and (sync_hook.calls, async_hook.calls) != (STEPS * 2 * 7, STEPS * 2 * 7):
            problems.append(f"{name}: a synchronous __call__ override was bypassed: {sync_hook.calls} {async_hook.calls}")
        # drain before the hooks are dropped: StaleHook's last exchange is still in flight, and a gloo
        # send/recv work freed in flight (its ring exchange) left the next hook's first collective hung
        sync_hook.reset()
        async_hook.reset()
    return {"problems": problems, "compared": compared}


def _raises(fn: Callable[[], Any], kind: type) -> str:
    try:
        fn()
    except kind as exc:
        return str(exc)
    return ""


def ordering_worker(rank: int, world: int) -> dict[str, Any]:
    """The ordering rule on every hook kind: a second start() on an outstanding key and a step or
    request mark with outstanding works raise OutstandingWorkError and change nothing (the results
    afterwards equal a hook that never saw the refused calls); futures and threads decode once."""
    out: dict[str, Any] = {"problems": [], "messages": {}}
    problems = out["problems"]
    for name, make in hook_factories():
        if name not in ("int2/ef", "auto/ef", "passthrough", "cast", "stale", "link_aware", "rules", "wrapping"):
            continue
        hook, reference = make(), make()
        for step in range(3):
            x = inputs(rank, world, step, "all_to_all")
            first = hook.start(CollectiveCall("all_to_all", x, None, key="k"))
            second = _raises(lambda: hook.start(CollectiveCall("all_to_all", x, None, key="k")), ch.OutstandingWorkError)
            other = hook.start(CollectiveCall("ring_exchange", x, None, key="r"))  # another key may overlap
            at_step = _raises(hook.next_step, ch.OutstandingWorkError)
            at_request = _raises(hook.begin_request, ch.OutstandingWorkError)
            if not (second and at_step and at_request):
                problems.append(f"{name} step {step}: no OutstandingWorkError ({second!r}, {at_step!r}, {at_request!r})")
            out["messages"][name] = [second, at_step]
            got_r = other.get_future().then(lambda f: f.value() * 1).wait()
            got_k = first.wait()
            if first.wait() is not got_k or first.get_future().wait() is not got_k or not first.is_completed():
                problems.append(f"{name}: wait() after wait() is not the same result")
            want_k = reference(CollectiveCall("all_to_all", x, None, key="k"))
            want_r = reference(CollectiveCall("ring_exchange", x, None, key="r"))
            if not (same_bits(got_k, want_k) and same_bits(got_r, want_r)):
                problems.append(f"{name} step {step}: results after a refused call differ")
            hook.next_step()  # nothing outstanding now
            reference.next_step()
        # two threads wait on one work: one decode, the same tensor for both
        work = hook.start(CollectiveCall("all_gather", inputs(rank, world, 9, "all_gather"), None, key="g"))
        seen: list[torch.Tensor] = []
        threads = [threading.Thread(target=lambda: seen.append(work.wait())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want = reference(CollectiveCall("all_gather", inputs(rank, world, 9, "all_gather"), None, key="g"))
        if len(seen) != 2 or seen[0] is not seen[1] or not same_bits(seen[0], want):
            problems.append(f"{name}: two threads waiting got different results")
        if byte_totals(hook)[:2] != byte_totals(reference)[:2]:
            problems.append(f"{name}: byte counts differ from the reference: {byte_totals(hook)} {byte_totals(reference)}")
    return out


def overlap_worker(rank: int, world: int, delay_s: float, signal_dir: str) -> list[dict[str, Any]]:
    """Rank 1 sleeps ``delay_s`` before starting its side of each exchange; rank 0 records when its
    start() returned, whether the work was completed then, and when it first saw it completed while
    polling (the transfer finishing in the background, before any wait()). Rank 1 creates a file in
    ``signal_dir`` when its ``wait()`` returned; rank 0 keeps computing until it sees that file (or a
    deadline), so "the peer finished before this rank's wait()" is an order of events, not a race."""
    records = []
    for i, (name, cfg, op) in enumerate([("compact", {"compressor": "int2", "timeout_s": 60}, "all_to_all"),
                          ("compact", {"compressor": "int2", "timeout_s": 60}, "ring_exchange"),
                          ("compact", {"compressor": "int2", "timeout_s": 60}, "all_gather"),
                          ("compact", {"compressor": "int2", "timeout_s": 60}, "all_reduce"),
                          ("passthrough", {"hook": "passthrough", "timeout_s": 60}, "all_to_all")]):
        done_file = os.path.join(signal_dir, f"peer_done.{i}")
        hook, reference = ch.build_hook(cfg), ch.build_hook(cfg)
        for step in range(2):  # the full send and its header check, then a steady exchange: both synchronous
            hook(CollectiveCall(op, inputs(rank, world, step, op), None, key="x"))
            reference(CollectiveCall(op, inputs(rank, world, step, op), None, key="x"))
        call = CollectiveCall(op, inputs(rank, world, 2, op), None, key="x")
        dist.barrier()
        rec: dict[str, Any] = {"hook": name, "op": op}
        if rank == 1:
            time.sleep(delay_s)
            rec["peer_started"] = time.time()
            got = hook.start(call).wait()
            rec["peer_done"] = time.time()
            open(done_file, "w").close()
        else:
            work = hook.start(call)
            rec["start_returned"] = time.time()
            rec["completed_after_start"] = work.is_completed()
            # the caller's compute: until the peer's wait() returned (its file) and the transfer is seen
            # completed (gloo's point-to-point works report completion only in wait()), or a deadline
            deadline = time.monotonic() + delay_s + 3.0
            while time.monotonic() < deadline:
                if "seen_completed" not in rec and work.is_completed():
                    rec["seen_completed"] = time.time()
                if op == "all_reduce" and "seen_completed" in rec:
                    break  # its second stage starts in wait(): the peer cannot finish before it
                if os.path.exists(done_file) and ("seen_completed" in rec or op == "ring_exchange"):
                    break
                time.sleep(0.005)
            rec["completed_before_wait"] = work.is_completed()
            rec["wait_called"] = time.time()
            got = work.wait()
        rec["equal"] = same_bits(got, reference(call))
        records.append(rec)
    return records


# -- the dead-peer job (torchrun) ----------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("kill", "hang"), required=True)
    parser.add_argument("--timeout-s", type=float, default=4.0)
    parser.add_argument("--op", default="all_to_all")
    parser.add_argument("--hook", default="compact")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))  # only timeout_s may bound the wait
    rank, world = dist.get_rank(), dist.get_world_size()
    hook = ch.build_hook({"hook": args.hook, "compressor": "int2", "timeout_s": args.timeout_s})
    for step in range(2):
        hook(CollectiveCall(args.op, inputs(rank, world, step, args.op), None, key="x"))
    dist.barrier()
    call = CollectiveCall(args.op, inputs(rank, world, 2, args.op), None, key="x")
    if rank == 1:
        time.sleep(0.5)  # rank 0's start() is in flight by now
        print(f"@@VICTIM rank=1 t={time.time():.3f}", flush=True)
        if args.mode == "hang":
            time.sleep(30)  # past timeout_s; the test ends this process afterwards
            os._exit(0)
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    work = hook.start(call)
    returned = time.monotonic() - started
    time.sleep(1.0)  # compute while the exchange is outstanding
    try:
        work.wait()
    except ch.CompactHooksError as exc:
        line = (f"@@FAILED rank={rank} after={time.monotonic() - started:.2f} start={returned:.3f} "
                f"{type(exc).__name__}: {exc}".replace("\n", " "))
        os.write(2, (line[:3000] + "\n").encode())
        os._exit(3)
    print(f"@@NOERROR rank={rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
