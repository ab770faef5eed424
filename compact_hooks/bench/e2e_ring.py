"""``compact-hooks bench e2e --mode ring``: ring attention across emulated hosts, per link rate.

::

    compact-hooks bench e2e --mode ring --hosts 3 --model small --steps 20 \\
        --rate 1gbit --rate 100mbit --rate 20mbit [--json] [--out FILE.json]

For each ``--rate``, ``--hosts`` emulated hosts (one rank each; links capped with ``tbf``; needs root)
run one mpirun of :mod:`compact_hooks.bench.e2e_ring_worker`: ``compute_only``, ``ring``
(uncompressed, overlapped one hop ahead), ``compact_int2_sync`` (the per-hop path: exchange, then
compute, each hop re-encoded), ``compact_int2_always`` (the relay ring: encoded once, forwarded
unchanged, one hop ahead), ``compact_int2`` (that relay with ``"plain_when_faster": true``: a call site
where the plain relay measured faster sends it from then on),
``stale`` and ``stale_int2`` (the previous step's K/V, uncompressed / int2). Per rate:
latency per image, wire bytes per step, PSNR of the final latent against ``ring``, and for the
compressed rows ``hidden_comm_fraction``: the share of the row's exchange time (its wire bytes at the
link rate) that did not block the caller (1 - (time blocked in ``wait()`` less the codec decode time
spent there) / exchange time, clamped to [0, 1]; means over ranks; an estimate: a rank waiting for a
slower peer counts as blocked). The fastest rate's job also measures the relative error of the
K/V block received at the first and at the last hop (``first_hop_rel_error`` / ``last_hop_rel_error``)
of ``compact_int2_sync`` and ``compact_int2_always`` (rate-independent, copied to the other rates).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from compact_hooks.launcher.netns import parse_rate

from .e2e_format import _f
from .e2e_jobs import _div, _steady, report, run_rate
from .e2e_setup import PROGRESS, model_info

ROWS = ("compute_only", "ring", "compact_int2_sync", "compact_int2_always", "compact_int2", "stale", "stale_int2")
COMPRESSED = ("compact_int2_sync", "compact_int2_always", "compact_int2", "stale_int2")
PROBED = ("compact_int2_sync", "compact_int2_always")  # hop errors: the per-hop path and the relay
ERRORS = ("first_hop_rel_error", "last_hop_rel_error")
TARGETS = {"never_slower": 1.05, "overlap_speedup": 1.2, "stale_vs_compute": 1.5, "hop_error_growth": 1.1}


def derive_rate(raw: dict[str, Any], steps: int) -> dict[str, Any]:
    """A rate's table: bytes per step, speedups, hidden communication."""
    rate_bits = parse_rate(raw["rate"])
    missing = [m["name"] for m in raw["methods"] if m.get("missing")]
    rows = {m["name"]: dict(m) for m in raw["methods"] if not m.get("missing")}
    t_u, t_c = rows["ring"]["latency_s"], rows["compute_only"]["latency_s"]
    for name, m in rows.items():
        m["steady_step_s"] = _steady(m.get("step_end_s") or [])
        m["wire_bytes_per_step"] = m["wire_bytes"] / steps
        m["speedup_vs_uncompressed"] = _div(t_u, m["latency_s"])
        m["wire_ratio"] = _div(rows["ring"]["wire_bytes"], m["wire_bytes"])
        m["exchange_s"] = 8.0 * m["wire_bytes"] / rate_bits  # this rank's bytes at the link rate
        if name in COMPRESSED or name == "ring":
            blocked = max(0.0, m["wait_s"] - m.get("decode_s_mean", 0.0))  # waiting for bytes, not decoding
            hidden = 1.0 - blocked / m["exchange_s"] if m["exchange_s"] else None
            m["hidden_comm_fraction"] = None if hidden is None else min(1.0, max(0.0, hidden))
    return {"rate": raw["rate"], "rate_bits_per_s": rate_bits, "tbf_burst_bytes": raw.get("tbf_burst_bytes"),
            "world_size": raw["world"], "compute_only_s": t_c, "uncompressed_s": t_u,
            "comm_fraction_uncompressed": (t_u - t_c) / t_u if t_u else None,
            "methods": [rows[n] for n in ROWS if n in rows], "missing_methods": missing}


def share_errors(rates: list[dict[str, Any]]) -> None:
    """Copy the (rate-independent) hop errors from the rate that measured them to the others."""
    for name in PROBED:
        source = next((r for r in rates for m in r["methods"] if m["name"] == name and m.get(ERRORS[0]) is not None),
                      None)
        if source is None:
            continue
        values = next({k: m[k] for k in ERRORS} for m in source["methods"] if m["name"] == name)
        for r in rates:
            for m in r["methods"]:
                if m["name"] == name:
                    m.update(values)
                    m["hop_errors_measured_in_rate"] = source["rate"]


def assess(rates: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets (issue 21): at every rate and at the rate where ``ring`` communicates most."""
    if not rates:
        return {}
    checks: list[dict[str, Any]] = []
    for r in rates:
        by = {m["name"]: m for m in r["methods"]}
        if {"compact_int2", "ring", "compact_int2_sync"} <= set(by):
            best = min(by["ring"]["latency_s"], by["compact_int2_sync"]["latency_s"])
            checks.append({"target": f"{r['rate']}: compact_int2 <= {TARGETS['never_slower']} x min(ring, sync)",
                           "value": _div(by["compact_int2"]["latency_s"], best),
                           "met": by["compact_int2"]["latency_s"] <= TARGETS["never_slower"] * best})
    worst = max(rates, key=lambda r: r["comm_fraction_uncompressed"] or 0.0)
    by = {m["name"]: m for m in worst["methods"]}
    checks.append({"target": f"{worst['rate']}: comm_fraction_uncompressed >= 0.9",
                   "value": worst["comm_fraction_uncompressed"], "met": (worst["comm_fraction_uncompressed"] or 0) >= 0.9})
    if {"compact_int2", "compact_int2_sync"} <= set(by):
        ratio = _div(by["compact_int2_sync"]["latency_s"], by["compact_int2"]["latency_s"])
        checks.append({"target": f"{worst['rate']}: compact_int2_sync / compact_int2 >= {TARGETS['overlap_speedup']}",
                       "value": ratio, "met": (ratio or 0) >= TARGETS["overlap_speedup"]})
    stale = by.get("stale_int2")
    checks.append({"target": f"{worst['rate']}: stale_int2 <= {TARGETS['stale_vs_compute']} x compute_only",
                   "value": _div(stale["latency_s"], worst["compute_only_s"]) if stale else None,
                   "met": bool(stale) and stale["latency_s"] <= TARGETS["stale_vs_compute"] * worst["compute_only_s"]})
    for name in ("compact_int2_always", "compact_int2_sync"):  # compact_int2 is this relay or the exact plain one
        m = by.get(name, {})
        growth = _div(m.get("last_hop_rel_error"), m.get("first_hop_rel_error"))
        relay = name == "compact_int2_always"
        if relay or growth is not None:
            checks.append({"target": f"{name}: last-hop error / first-hop error"
                                     + (f" <= {TARGETS['hop_error_growth']}" if relay else ""),
                           "value": growth, "met": growth is not None and growth <= TARGETS["hop_error_growth"]
                           if relay else None})
    return {"rate": worst["rate"], "checks": checks}


def run_ring_bench(rates: list[str], hosts: int = 3, model: str = "small", steps: int = 20, seed: int = 0,
                   timeout: float = 3600.0, echo: bool = True, burst: Optional[int] = None) -> dict[str, Any]:
    """Run the ring bench (see the module docstring); returns the ``--json`` document."""
    from compact_hooks.launcher import netns

    if hosts < 2:
        raise ValueError(f"--mode ring needs --hosts >= 2; got {hosts}")
    if not rates or steps < 1:
        raise ValueError("give at least one --rate and --steps >= 1")
    for r in rates:
        parse_rate(r)
    netns.check_available()
    netns.mpirun_path()
    start = time.monotonic()
    fastest = max(rates, key=parse_rate)
    base = ["--model", model, "--steps", str(steps), "--seed", str(seed), "--timeout", str(timeout)]
    derived = []
    for i, rate in enumerate(rates):
        extra = ["--probe"] if rate == fastest and fastest not in rates[:i] else []
        raw = run_rate(rate, hosts, [*base, *extra], timeout, echo, burst, 1, "compact_hooks.bench.e2e_ring_worker",
                       "ring bench")
        derived.append(derive_rate(raw, steps))
    share_errors(derived)
    return {"bench": "e2e", "mode": "ring", "model": model_info(model), "hosts": hosts, "steps": steps, "seed": seed,
            "threads_per_rank": 1,
            "timing": "latency_s: slowest rank's time from a barrier until the pipeline returned",
            "wire_bytes": "what one rank sends for the attention collectives (K/V hops), mean over ranks",
            "hidden_comm_fraction": "1 - (seconds blocked in wait() - codec decode seconds) / (wire bytes at the link "
                                    "rate), in [0, 1], means over ranks",
            "hop_errors": f"relative error of the relayed K/V block at hop 1 and hop {hosts - 1} against the exact "
                          f"source block, averaged over layers, steps and ranks (measured at {fastest})",
            "rates": derived, "targets": assess(derived), "wall_s": time.monotonic() - start}


def format_result(result: dict[str, Any]) -> str:
    m = result["model"]
    parts = [f"bench e2e --mode ring: {result['hosts']} emulated hosts, model {m['name']} ({m['tokens']} tokens), "
             f"{result['steps']} steps, 1 torch thread per rank"]
    head = (f"{'method':<19}{'latency s':>10}{'step s':>8}{'MB/step':>9}{'ratio':>7}{'speedup':>8}{'hidden':>7}"
            f"{'hop1 err':>10}{'last err':>10}{'PSNR dB':>8}{'enc':>6}")
    for r in result["rates"]:
        lines = [f"== rate {r['rate']}: comm fraction (uncompressed) {_f(r['comm_fraction_uncompressed'], '.3f')}, "
                 f"compute_only {r['compute_only_s']:.2f} s", head, "-" * len(head)]
        for x in r["methods"]:
            lines.append(f"{x['name']:<19}{x['latency_s']:>10.2f}{_f(x['steady_step_s'], '.3f'):>8}"
                         f"{_f(x['wire_bytes_per_step'], '.3f', 1e-6):>9}{_f(x['wire_ratio'], '.1f'):>7}"
                         f"{_f(x['speedup_vs_uncompressed'], '.2f'):>8}{_f(x.get('hidden_comm_fraction'), '.2f'):>7}"
                         f"{_f(x.get('first_hop_rel_error'), '.2e'):>10}{_f(x.get('last_hop_rel_error'), '.2e'):>10}"
                         f"{_f(x.get('psnr_db'), '.1f'):>8}{x.get('encode_calls', 0):>6}")
        chosen = next((x for x in r["methods"] if x["name"] == "compact_int2" and "chosen_sites" in x), None)
        if chosen is not None:
            lines.append(f"compact_int2 (plain_when_faster) sent {chosen['plain_sites']} of {chosen['chosen_sites']} "
                         "call sites plain")
        if r.get("missing_methods"):
            lines.append(f"not run (hook not available): {', '.join(r['missing_methods'])}")
        parts.append("\n".join(lines))
    t = result.get("targets") or {}
    if t:
        parts.append("\n".join(["== targets"] + [
            f"{'MET ' if c['met'] else ('    ' if c['met'] is None else 'MISS')} {c['target']:<62} {_f(c['value'], '.3f')}"
            for c in t["checks"]]))
    parts.append(f"wall time {result['wall_s']:.0f} s")
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> int:
    """``bench e2e --mode ring`` (called by :func:`compact_hooks.bench.e2e.main`)."""
    return report(args, lambda: run_ring_bench(args.rate or [], args.hosts, args.model, args.steps, args.seed,
                                               args.timeout, not args.quiet, args.burst), format_result)


__all__ = ["PROGRESS", "ROWS", "TARGETS", "assess", "derive_rate", "format_result", "main", "run_ring_bench"]
