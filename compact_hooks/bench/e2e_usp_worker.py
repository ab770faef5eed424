"""Rank program of ``compact-hooks bench e2e --mode usp``; :mod:`compact_hooks.bench.e2e_usp` starts it
with mpirun on emulated hosts (several ranks per host)::

    python -m compact_hooks.bench.e2e_usp_worker --model small --steps 4 --rate 10mbit --result r.json

Every rank builds the same random-weight FLUX pipeline; in one process group every method runs USP
(Ulysses inside each host, ring across hosts; groups from the hostnames) on the same inputs and seed:

* ``compute_only``: a hook that returns tensors of the right shape without communicating (twice:
  first and last; the row is the faster, the cores are shared);
* ``usp``: uncompressed (PassthroughHook on every hop);
* ``usp_compress_all``: CompactHook (``--codec``, first step ``--warmup-codec``) on every hop;
* ``usp_inter_host``: the same CompactHook on the inter-host hops only (LinkAwareHook), the
  intra-host all-to-alls plain.

Each hook is a :class:`~compact_hooks.hooks.links.LinkAwareHook`, so every row has bytes per link
class. Rank 0 writes the raw measurements (latency: slowest rank; bytes: mean over ranks) to ``--result``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.bench.e2e import model_info
from compact_hooks.bench.e2e_worker import Bench, NoopHook, Run, add_quality, progress, run_worker, worker_parser
from compact_hooks.hook import CommHook
from compact_hooks.hooks.links import LinkAwareHook
from compact_hooks.topology import LINK_CLASSES, Topology

POLICIES: dict[str, tuple[str, ...]] = {
    "usp": (),
    "usp_compress_all": ("intra_host", "inter_host"),
    "usp_inter_host": ("inter_host",),
}


def link_hook(topology: Topology, compress: tuple[str, ...], codec: Any, warmup_codec: Optional[Any]) -> CommHook:
    """A LinkAwareHook compressing ``compress`` with ``codec`` (first step ``warmup_codec``)."""
    cfg: dict[str, Any] = {"compressor": codec, "residual": "ef"}
    if warmup_codec:
        cfg["warmup_compressor"] = warmup_codec
    compressed: CommHook = ch.CompactHook(cfg) if compress else ch.PassthroughHook()
    return LinkAwareHook(compressed, ch.PassthroughHook(), topology, compress=compress)


def _mean_links(bench: Bench, links: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per link class, bytes and calls averaged over the ranks."""
    every: list[Any] = [None] * bench.world
    dist.all_gather_object(every, links, group=bench.group)
    out: dict[str, dict[str, Any]] = {}
    for c in LINK_CLASSES:
        raw = sum(e[c]["raw_bytes"] for e in every) / bench.world
        wire = sum(e[c]["wire_bytes"] for e in every) / bench.world
        out[c] = {"raw_bytes": raw, "wire_bytes": wire, "calls": sum(e[c]["calls"] for e in every) / bench.world,
                  "compression_ratio": raw / wire if wire else None}
    return out


def measure(bench: Bench, name: str, hook: CommHook) -> tuple[dict[str, Any], Run]:
    progress(bench, f"{name} ...")
    run, metered, stats = bench.parallel_run(hook, "usp")
    links = stats.get("links") or {c: {"raw_bytes": 0, "wire_bytes": 0, "calls": 0} for c in LINK_CLASSES}
    per = _mean_links(bench, links)
    row = {"name": name, "mode": "usp", "hook": type(hook).__name__, "latency_s": run.latency_s,
           "step_end_s": run.step_end_s, "raw_bytes": sum(p["raw_bytes"] for p in per.values()),
           "wire_bytes": 0.0 if isinstance(hook, NoopHook) else sum(p["wire_bytes"] for p in per.values()),
           "links": per, "hook_calls": metered.timer.calls, "hook_s": metered.timer.seconds}
    progress(bench, f"{name}: {run.latency_s:.2f} s, inter-host {per['inter_host']['wire_bytes'] / 1e6:.2f} MB/rank, "
                    f"intra-host {per['intra_host']['wire_bytes'] / 1e6:.2f} MB/rank")
    return row, run


def methods(bench: Bench, codec: Any, warmup_codec: Optional[Any]) -> list[dict[str, Any]]:
    """Every USP method in one process group; quality against uncompressed USP (rank 0)."""
    topology = Topology()
    bench.parallel_run(NoopHook(), "usp", steps=1)  # first-call costs outside any timing
    plan: list[tuple[str, Any]] = [("compute_only", NoopHook)]
    plan += [(name, (lambda c=c: link_hook(topology, c, codec, warmup_codec))) for name, c in POLICIES.items()]
    plan.append(("compute_only", NoopHook))
    rows: list[dict[str, Any]] = []
    runs: dict[str, Run] = {}
    computes: list[tuple[dict[str, Any], Run]] = []
    for name, make in plan:
        row, run = measure(bench, name, make())
        if name == "compute_only":
            computes.append((row, run))
            continue
        rows.append(row)
        runs[name] = run
    row, run = min(computes, key=lambda rr: rr[0]["latency_s"])
    row["latency_runs_s"] = [r["latency_s"] for r, _ in computes]
    rows.insert(0, row)
    runs["compute_only"] = run
    add_quality(bench, rows, runs, "usp")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = worker_parser("compact_hooks.bench.e2e_usp_worker", "label of the inter-host link rate (the driver set the cap)")
    p.add_argument("--codec", type=json.loads, default='"int2"', help="compressor spec (JSON)")
    p.add_argument("--warmup-codec", type=json.loads, default='"int8"', help="first-step compressor (JSON or null)")
    args = p.parse_args(argv)

    def body(bench: Bench) -> dict[str, Any]:
        hosts = Topology().hosts(bench.group)
        progress(bench, f"rate {args.rate}: {bench.world} ranks on {len(set(hosts))} hosts, model {args.model}, "
                        f"{args.steps} steps, USP")
        rows = methods(bench, args.codec, args.warmup_codec)
        return {"model": model_info(args.model), "hosts": list(hosts), "methods": rows,
                "codec": args.codec, "warmup_codec": args.warmup_codec}

    return run_worker(args, body)


if __name__ == "__main__":
    sys.exit(main())
