"""``compact-hooks bench e2e --mode usp``: USP inference on emulated hosts with several ranks each.

::

    compact-hooks bench e2e --mode usp --hosts 2 --ranks-per-host 2 --rate 10mbit --model small --steps 4

For each ``--rate``, ``--hosts`` emulated hosts hold ``--ranks-per-host`` ranks each; the inter-host
links are capped with ``tbf`` at the rate, ranks on one host talk over its loopback (uncapped). One
mpirun of :mod:`compact_hooks.bench.e2e_usp_worker` runs uncompressed USP, USP with every hop
compressed and USP with the inter-host hops compressed only; the table has the latency per image,
the wire bytes per link class and the PSNR of the final latent against uncompressed USP.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional

from compact_hooks.launcher.netns import parse_rate

from .e2e_format import _f
from .e2e_jobs import _div, _steady, report, run_rate
from .options import spec_arg

METHODS = ("compute_only", "usp", "usp_compress_all", "usp_inter_host")
TARGETS = {"comm_fraction": 0.9, "speedup": 4.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench e2e`` that select and shape the USP bench."""
    p.add_argument("--mode", choices=["ulysses", "ring", "usp"], default="ulysses",
                   help="ulysses: one rank per host, every method (default); ring: ring attention, the relay ring "
                        "vs the per-hop path and stale K/V; usp: Ulysses inside a host, ring across hosts, "
                        "compression on every hop vs on the inter-host hops only")
    p.add_argument("--ranks-per-host", type=int, default=1, help="ranks per emulated host (--mode usp)")
    p.add_argument("--codec", default="int2", help="compressor of the USP methods (name or JSON spec)")
    p.add_argument("--warmup-codec", default="int8", help="first-step compressor of the USP methods ('none': full)")


def derive_rate(raw: dict[str, Any], steps: int) -> dict[str, Any]:
    rows = {m["name"]: dict(m) for m in raw["methods"]}
    t_u, t_c = rows["usp"]["latency_s"], rows["compute_only"]["latency_s"]
    for m in rows.values():
        m["steady_step_s"] = _steady(m.get("step_end_s") or [])
        m["wire_bytes_per_step"] = m["wire_bytes"] / steps
        m["speedup_vs_uncompressed"] = _div(t_u, m["latency_s"])
        m["wire_ratio"] = _div(rows["usp"]["wire_bytes"], m["wire_bytes"])
    return {"rate": raw["rate"], "rate_bits_per_s": parse_rate(raw["rate"]), "tbf_burst_bytes": raw.get("tbf_burst_bytes"),
            "world_size": raw["world"], "rank_hosts": raw["hosts"], "codec": raw["codec"],
            "warmup_codec": raw["warmup_codec"], "compute_only_s": t_c, "uncompressed_s": t_u,
            "comm_fraction_uncompressed": (t_u - t_c) / t_u if t_u else None,
            "methods": [rows[n] for n in METHODS if n in rows]}


def assess(rates: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at the rate where uncompressed USP communicates most."""
    if not rates:
        return {}
    worst = max(rates, key=lambda r: r["comm_fraction_uncompressed"] or 0.0)
    by = {m["name"]: m for m in worst["methods"]}
    only, every = by["usp_inter_host"], by["usp_compress_all"]
    intra = only["links"]["intra_host"]
    checks = [
        {"target": "comm_fraction_uncompressed >= 0.9", "value": worst["comm_fraction_uncompressed"],
         "met": (worst["comm_fraction_uncompressed"] or 0) >= TARGETS["comm_fraction"]},
        {"target": "usp_inter_host at least as fast as usp_compress_all",
         "value": _div(every["latency_s"], only["latency_s"]), "met": only["latency_s"] <= every["latency_s"]},
        {"target": "usp_inter_host PSNR > usp_compress_all PSNR", "value": only["psnr_db"],
         "other": every["psnr_db"], "met": (only["psnr_db"] or 0) > (every["psnr_db"] or 0)},
        {"target": f"usp_inter_host speedup >= {TARGETS['speedup']:g}x", "value": only["speedup_vs_uncompressed"],
         "met": (only["speedup_vs_uncompressed"] or 0) >= TARGETS["speedup"]},
        {"target": "intra-host bytes untouched under inter_host (ratio 1)", "value": intra["compression_ratio"],
         "met": intra["raw_bytes"] == intra["wire_bytes"]},
    ]
    return {"rate": worst["rate"], "value": "per image (all steps)", "checks": checks}


def run_usp_bench(rates: list[str], hosts: int, per_host: int, model: str, steps: int, seed: int = 0,
                  codec: Any = "int2", warmup_codec: Any = "int8", timeout: float = 3600.0, echo: bool = True,
                  burst: Optional[int] = None) -> dict[str, Any]:
    """Run the USP bench (see the module docstring); returns the ``--json`` document."""
    from compact_hooks.launcher import netns

    if hosts < 2 or per_host < 1:
        raise ValueError(f"--mode usp needs --hosts >= 2 and --ranks-per-host >= 1; got {hosts} and {per_host}")
    if not rates or steps < 1:
        raise ValueError("give at least one --rate and --steps >= 1")
    for r in rates:
        parse_rate(r)
    netns.check_available()
    warm = None if warmup_codec in (None, "none", "full") else warmup_codec
    start = time.monotonic()
    base = ["--model", model, "--steps", str(steps), "--seed", str(seed), "--codec", json.dumps(codec),
            "--warmup-codec", json.dumps(warm), "--timeout", str(timeout)]
    raws = [run_rate(r, hosts, base, timeout, echo, burst, per_host, "compact_hooks.bench.e2e_usp_worker", "USP bench")
            for r in rates]
    derived = [derive_rate(raw, steps) for raw in raws]
    return {"bench": "e2e", "mode": "usp", "model": raws[0]["model"], "hosts": hosts, "ranks_per_host": per_host,
            "ulysses_degree": per_host, "ring_degree": hosts, "steps": steps, "seed": seed, "threads_per_rank": 1,
            "link": "inter-host links capped with tbf at the rate; ranks on one host share its loopback (uncapped)",
            "timing": "latency_s: slowest rank's time from a barrier until the pipeline returned",
            "wire_bytes": "what one rank sends for the attention collectives per image (mean over ranks), "
                          "in total and per link class (methods[].links)",
            "rates": derived, "targets": assess(derived), "wall_s": time.monotonic() - start}


def format_result(result: dict[str, Any]) -> str:
    m = result["model"]
    parts = [f"bench e2e --mode usp: {result['hosts']} emulated hosts x {result['ranks_per_host']} ranks (Ulysses "
             f"{result['ulysses_degree']} inside a host, ring {result['ring_degree']} across), model {m['name']} "
             f"({m['tokens']} tokens), {result['steps']} steps, 1 torch thread per rank"]
    head = (f"{'method':<18}{'latency s':>10}{'speedup':>8}{'inter MB':>9}{'ratio':>7}{'intra MB':>9}{'ratio':>7}"
            f"{'PSNR dB':>8}{'rel-L2':>9}")
    for r in result["rates"]:
        lines = [f"== inter-host rate {r['rate']}: comm fraction (uncompressed) {_f(r['comm_fraction_uncompressed'], '.3f')}"
                 f", codec {r['codec']} (first step {r['warmup_codec']})", head, "-" * len(head)]
        for x in r["methods"]:
            inter, intra = x["links"]["inter_host"], x["links"]["intra_host"]
            lines.append(f"{x['name']:<18}{x['latency_s']:>10.2f}{_f(x['speedup_vs_uncompressed'], '.2f'):>8}"
                         f"{_f(inter['wire_bytes'], '.2f', 1e-6):>9}{_f(inter['compression_ratio'], '.2f'):>7}"
                         f"{_f(intra['wire_bytes'], '.2f', 1e-6):>9}{_f(intra['compression_ratio'], '.2f'):>7}"
                         f"{_f(x['psnr_db'], '.1f'):>8}{_f(x['rel_l2'], '.1e'):>9}")
        parts.append("\n".join(lines))
    t = result.get("targets") or {}
    if t:
        parts.append("\n".join([f"== targets at {t['rate']}"] + [
            f"{'MET ' if c['met'] else 'MISS'} {c['target']:<58} {_f(c['value'], '.3f')}" for c in t["checks"]]))
    parts.append(f"wall time {result['wall_s']:.0f} s")
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> int:
    """``bench e2e --mode usp`` (called by :func:`compact_hooks.bench.e2e.main`)."""
    return report(args, lambda: run_usp_bench(args.rate or [], args.hosts, args.ranks_per_host, args.model, args.steps,
                                              args.seed, spec_arg(args.codec), spec_arg(args.warmup_codec), args.timeout,
                                              not args.quiet, args.burst), format_result)
