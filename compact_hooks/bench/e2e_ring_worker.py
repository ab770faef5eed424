"""Rank program of ``compact-hooks bench e2e --mode ring``; :mod:`compact_hooks.bench.e2e_ring` starts it
with mpirun on emulated hosts (one rank per host)::

    python -m compact_hooks.bench.e2e_ring_worker --model small --steps 20 --rate 20mbit --result r.json

Every rank builds the same random-weight FLUX pipeline and runs ring attention (``parallelize(...,
mode="ring")``) with every method on the same inputs and seed (see :data:`RING_METHODS`):

* ``compute_only``: no communication (three runs, the median kept);
* ``ring``: uncompressed relay ring, the next hop in flight while a block's attention runs;
* ``compact_int2_sync``: int2 with error feedback on the per-hop path (exchange a hop, then compute;
  each hop re-encodes the block it decoded): the synchronous path, kept for comparison;
* ``compact_int2_always``: int2 relay ring (encoded once per step, forwarded unchanged, one hop ahead);
* ``compact_int2``: the same with ``"plain_when_faster": true`` (each call site times its relay
  compressed and, unless the link is too slow for plain to win, plain once; it keeps the faster);
* ``stale`` / ``stale_int2``: the previous step's K/V (DistriFusion), uncompressed / int2 compressed.

With ``--probe`` (the fastest rate's job) the per-hop and the relay int2 methods run once more, untimed, with every
relay's blocks compared to the exact source blocks (a plain all-gather of each K/V): the relative
error of the block received at the first and at the last hop, averaged over layers, steps and ranks.
Rank 0 writes the raw measurements as JSON to ``--result``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional

import torch

import compact_hooks as ch
from compact_hooks.collectives import all_gather
from compact_hooks.collectives.relay import Relay
from compact_hooks.hook import CollectiveCall, CommHook, WrappingHook
from compact_hooks.work import CollectiveWork, Watch

from .e2e_ring import PROBED
from .e2e_worker import (
    Bench,
    CodecTimers,
    NoopHook,
    Run,
    _finite,
    add_quality,
    compact_of,
    keep_median_compute,
    progress,
    run_worker,
    worker_parser,
)

# name -> (hook config, per-hop path); a config that does not build (its hook is missing) skips the row
RING_METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "ring": ({"hook": "passthrough"}, False),
    "compact_int2_sync": ({"compressor": "int2"}, True),
    "compact_int2_always": ({"compressor": "int2"}, False),
    "compact_int2": ({"compressor": "int2", "plain_when_faster": True}, False),
    "stale": ({"hook": "stale"}, False),
    "stale_int2": ({"compressor": "int2", "stale": True}, False),
}


class PerHopRing(WrappingHook):
    """The per-hop path of the hook it wraps: ``start_relay`` is CommHook's (a ring exchange per hop,
    exchanged when needed), every call otherwise the inner hook's."""

    def start_relay(self, call: CollectiveCall) -> Relay:
        return CommHook.start_relay(self, call)


class HopErrorProbe(WrappingHook):
    """Compares every relayed block with the exact block of its source (one plain all-gather of the
    relayed tensor per relay, outside the hook) and keeps the relative error per hop."""

    def __init__(self, inner: CommHook) -> None:
        super().__init__(inner)
        self.errors: dict[int, list[float]] = {}

    def start_relay(self, call: CollectiveCall) -> Relay:
        exact = all_gather(call.tensor.unsqueeze(0), call.group, 0)
        relay = self.inner.start_relay(call)

        def probe(hop: int, work: CollectiveWork) -> CollectiveWork:
            def finish() -> torch.Tensor:
                got = work.wait()
                ref = exact[relay.source(hop)]
                err = float(torch.linalg.vector_norm((got - ref).double())
                            / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30))
                self.errors.setdefault(hop, []).append(err)
                return got
            return CollectiveWork([Watch(work)], finish, call.tensor.device)
        return relay.map(probe)


def make_hook(name: str) -> Optional[CommHook]:
    """The hook of a method (``None`` when its hook kind is not available in this build)."""
    cfg, per_hop = RING_METHODS[name]
    try:
        hook = ch.build_hook(cfg)
    except (ch.ConfigError, ValueError, TypeError):
        return None
    return PerHopRing(hook) if per_hop else hook


def measure(bench: Bench, name: str, hook: CommHook, steps: Optional[int] = None) -> tuple[dict[str, Any], Run]:
    """One timed ring run: latency, bytes (the hook's own counters, else the uncompressed bytes asked
    for), time blocked in waits, codec time (a CompactHook's)."""
    steps = steps or bench.steps
    progress(bench, f"{name} ...")
    inner = compact_of(hook) or compact_of(getattr(hook, "compact", hook))  # StaleCompactHook holds one
    codec = CodecTimers.install(inner) if inner is not None else None
    run, metered, stats = bench.parallel_run(hook, "ring", steps)
    if isinstance(hook, NoopHook):
        wire = 0.0
    elif stats.get("wire_bytes") is not None:
        wire = float(stats["wire_bytes"])
    else:
        wire = float(metered.raw_bytes)
    per_rank = bench.mean_over_ranks({"wire": wire, "raw": float(metered.raw_bytes), "wait": metered.wait_s,
                                      "decode": codec.decode.seconds if codec else 0.0})
    row = {"name": name, "mode": "ring", "hook": type(hook).__name__, "latency_s": run.latency_s,
           "step_end_s": run.step_end_s, "wire_bytes": per_rank["wire"], "raw_bytes": per_rank["raw"],
           "hook_calls": metered.timer.calls, "hook_s": metered.timer.seconds, "wait_s": per_rank["wait"],
           "decode_s_mean": per_rank["decode"],
           "encode_s": codec.encode.seconds if codec else 0.0, "decode_s": codec.decode.seconds if codec else 0.0,
           "encode_calls": codec.encode.calls if codec else 0, "decode_calls": codec.decode.calls if codec else 0}
    if "relay_choice" in stats:  # plain_when_faster: the call sites sent plain (rank 0's view; every rank agrees)
        row["plain_sites"] = sum(bool(c["plain"]) for c in stats["relay_choice"].values())
        row["chosen_sites"] = len(stats["relay_choice"])
    progress(bench, f"{name}: {run.latency_s:.2f} s, {per_rank['wire'] / steps / 1e6:.3f} MB/step/rank")
    return row, run


def probe_errors(bench: Bench, name: str) -> dict[str, Optional[float]]:
    """First- and last-hop relative error of a method's relayed K/V blocks (an untimed run)."""
    hook = make_hook(name)
    assert hook is not None
    probe = HopErrorProbe(hook)
    progress(bench, f"{name}: hop errors ...")
    bench.parallel_run(probe, "ring")
    last = bench.world - 1
    mine = {"first": _mean(probe.errors.get(1)), "last": _mean(probe.errors.get(last))}
    mean = bench.mean_over_ranks({k: v if v is not None else math.nan for k, v in mine.items()})
    return {"first_hop_rel_error": _finite(mean["first"]), "last_hop_rel_error": _finite(mean["last"])}


def _mean(values: Optional[list[float]]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def methods(bench: Bench, probe: bool) -> list[dict[str, Any]]:
    """Every ring method of one rate in one process group; quality against the uncompressed ring."""
    bench.parallel_run(NoopHook(), "ring", steps=1)  # first-call costs outside any timing
    plan: list[tuple[str, Callable[[], Optional[CommHook]]]] = [("compute_only", NoopHook)]
    plan += [(name, (lambda n=name: make_hook(n))) for name in RING_METHODS]
    plan[3:3] = [("compute_only", NoopHook)]
    plan.append(("compute_only", NoopHook))
    rows: list[dict[str, Any]] = []
    runs: dict[str, Run] = {}
    computes: list[tuple[dict[str, Any], Run]] = []
    missing = []
    for name, make in plan:
        hook = make()
        if hook is None:
            missing.append(name)
            continue
        row, run = measure(bench, name, hook)
        if name == "compute_only":
            computes.append((row, run))
            continue
        rows.append(row)
        runs[name] = run
    keep_median_compute(rows, runs, computes)
    add_quality(bench, rows, runs, "ring")
    if probe:
        for row in rows:
            if row["name"] in PROBED:
                row.update(probe_errors(bench, row["name"]))
    for name in missing:
        rows.append({"name": name, "missing": True})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = worker_parser("compact_hooks.bench.e2e_ring_worker")
    p.add_argument("--probe", action="store_true", help="also measure the first- and last-hop errors")
    args = p.parse_args(argv)

    def body(bench: Bench) -> dict[str, Any]:
        progress(bench, f"rate {args.rate}: {bench.world} ranks, model {args.model}, {args.steps} steps, ring attention")
        return {"methods": methods(bench, args.probe)}

    return run_worker(args, body)


if __name__ == "__main__":
    sys.exit(main())
