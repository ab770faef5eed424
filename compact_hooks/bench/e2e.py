"""``compact-hooks bench e2e``: end-to-end sequence-parallel inference across emulated hosts, per link rate.

::

    compact-hooks bench e2e --hosts 2 --rate 1gbit --rate 100mbit --rate 20mbit --model medium \\
        [--steps N] [--json] [--out FILE.json] [--plot FILE.png]

For each ``--rate``, ``--hosts`` emulated hosts (network namespaces, links capped with ``tbf``; needs
root) run one mpirun of :mod:`compact_hooks.bench.e2e_worker`, one rank per host and one
torch thread per rank. In that one process group every method runs on the same inputs and seed:

* ``compute_only``: Ulysses with a hook that returns tensors of the right shape without communicating;
* ``ulysses`` / ``allgather``: uncompressed (a CompactHook with compressor ``none``: the plain path);
* ``stale``: DistriFusion's stale K/V (StaleHook, all-gather mode);
* ``compact_int2`` / ``compact_int2_warm8`` (first step int8 instead of full) / ``compact_int1`` /
  ``compact_lowrank`` / ``compact_auto`` (adaptive level, ``--auto-target``): Ulysses with CompactHook,
  residual ``ef``;
* ``single``: the unparallelized model on rank 0 (rate-independent: timed once, in the first rate's run).

The model is a random-weight FLUX-architecture ``FluxPipeline`` run with ``output_type="latent"``
(scheduler and all, no VAE decode); quality is the final packed latent against the uncompressed
Ulysses run of the same rate (PSNR with the reference's dynamic range as peak, and rel-L2). Wire bytes
are what one rank sends for the attention collectives (ring / pairwise convention). The fastest rate's
run also holds the quality ladder (each codec under residual modes none, delta, ef, ef2, with the
error after every step) and the hook overhead (PassthroughHook vs raw ``all_to_all_single``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional

from compact_hooks.launcher.netns import parse_rate

from .e2e_format import format_ladder, format_overhead, format_rate, format_result, format_targets, plot_ladder
from .e2e_jobs import _div, _steady, _steps_s, report, run_rate
from .e2e_setup import (
    COMPACT_METHODS,
    DEFAULT_AUTO_TARGET,
    DEFAULT_STEPS,
    LADDER_CODECS,
    LADDER_MODES,
    METHOD_ORDER,
    MODELS,
    PIPELINE_NOTE,
    PROGRESS,
    PROJECT_STEPS,
    TARGETS,
    lowrank_spec,
    model_info,
)

__all__ = ["COMPACT_METHODS", "DEFAULT_AUTO_TARGET", "DEFAULT_STEPS", "LADDER_CODECS", "LADDER_MODES", "METHOD_ORDER",
           "MODELS", "PIPELINE_NOTE", "PROGRESS", "PROJECT_STEPS", "TARGETS", "add_parser", "assess", "derive_rate",
           "format_ladder", "format_overhead", "format_rate", "format_result", "format_targets", "lowrank_spec",
           "main", "model_info", "plot_ladder", "report", "run_bench", "run_rate"]

# ---- derived numbers ----------------------------------------------------------------------------


def _project(step_s: list[float], steady: Optional[float], steps: int = PROJECT_STEPS) -> Optional[float]:
    """Seconds per image at ``steps`` steps: the measured first step plus ``steps - 1`` steady steps."""
    return step_s[0] + (steps - 1) * steady if step_s and steady is not None else None


def _ideal(compute: Optional[float], uncompressed: Optional[float], ratio: Optional[float]) -> Optional[float]:
    """compute_only + (uncompressed - compute_only) / wire ratio."""
    if compute is None or uncompressed is None or not ratio:
        return None
    return compute + (uncompressed - compute) / ratio


def derive_rate(raw: dict[str, Any], steps: int) -> dict[str, Any]:
    """A rate's table from the worker's measurements: per-step bytes, ratios, speedups, ideal times."""
    rows = {m["name"]: dict(m) for m in raw["methods"]}
    for m in rows.values():
        m["steady_step_s"] = _steady(m.get("step_end_s") or [])
        m["step_s"] = _steps_s(m.get("step_end_s") or [])
        m[f"projected_{PROJECT_STEPS}_steps_s"] = _project(m["step_s"], m["steady_step_s"])
    unc, comp = rows["ulysses"], rows["compute_only"]
    t_u, t_c = unc["latency_s"], comp["latency_s"]
    s_u, s_c = unc["steady_step_s"], comp["steady_step_s"]
    for name, m in rows.items():
        m["wire_bytes_per_step"] = m["wire_bytes"] / steps
        m["wire_bytes_per_image"] = m["wire_bytes"]  # one request per run
        m["wire_bytes_steady_step"] = m.get("wire_bytes_later_step")
        m["speedup_vs_uncompressed"] = _div(t_u, m["latency_s"])
        m["steady_speedup_vs_uncompressed"] = _div(s_u, m["steady_step_s"])
        m[f"projected_{PROJECT_STEPS}_steps_speedup"] = _div(unc[f"projected_{PROJECT_STEPS}_steps_s"],
                                                             m[f"projected_{PROJECT_STEPS}_steps_s"])
        codec = m.get("encode_s", 0.0) + m.get("decode_s", 0.0)
        m["codec_s"] = codec
        m["outside_hooks_s"] = m["latency_s"] - m.get("hook_s", 0.0)  # model compute (rank 0), a contention gauge
        m["codec_share"] = _div(codec, m["latency_s"])
        m["hook_share"] = _div(m.get("hook_s", 0.0), m["latency_s"])
        if name in COMPACT_METHODS:
            m["wire_ratio"] = _div(unc["wire_bytes"], m["wire_bytes"])
            m["ideal_s"] = _ideal(t_c, t_u, m["wire_ratio"])
            m["x_ideal"] = _div(m["latency_s"], m["ideal_s"])
            m["steady_wire_ratio"] = _div(unc.get("wire_bytes_later_step"), m.get("wire_bytes_later_step"))
            m["steady_ideal_step_s"] = _ideal(s_c, s_u, m["steady_wire_ratio"])
            m["steady_x_ideal"] = _div(m["steady_step_s"], m["steady_ideal_step_s"])
    ordered = [rows[n] for n in METHOD_ORDER if n in rows] + [m for n, m in rows.items() if n not in METHOD_ORDER]
    return {
        "rate": raw["rate"], "rate_bits_per_s": parse_rate(raw["rate"]), "tbf_burst_bytes": raw.get("tbf_burst_bytes"),
        "world_size": raw["world"],
        "compute_only_s": t_c, "uncompressed_s": t_u,
        "comm_fraction_uncompressed": (t_u - t_c) / t_u if t_u else None,
        "steady_compute_only_step_s": s_c, "steady_uncompressed_step_s": s_u,
        "steady_comm_fraction_uncompressed": (s_u - s_c) / s_u if s_u and s_c is not None else None,
        "methods": ordered,
    }


def share_single(rates: list[dict[str, Any]]) -> None:
    """Copy the (rate-independent) ``single`` timing into the rates that did not measure it."""
    source = next((r for r in rates if any(m["name"] == "single" for m in r["methods"])), None)
    if source is None:
        return
    single = next(m for m in source["methods"] if m["name"] == "single")
    for r in rates:
        if r is not source and not any(m["name"] == "single" for m in r["methods"]):
            copy = {k: v for k, v in single.items() if k not in ("psnr_db", "rel_l2", "per_step_rel_l2")}
            copy.update(measured_in_rate=source["rate"], psnr_db=None, rel_l2=None,
                        speedup_vs_uncompressed=_div(r["uncompressed_s"], single["latency_s"]),
                        steady_speedup_vs_uncompressed=_div(r["steady_uncompressed_step_s"], single["steady_step_s"]))
            r["methods"].insert(0, copy)
    single["measured_in_rate"] = source["rate"]


def assess(rates: list[dict[str, Any]], overhead: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, judged at the rate where the uncompressed run communicates most."""
    if not rates:
        return {}
    worst = max(rates, key=lambda r: r["comm_fraction_uncompressed"] or 0.0)
    by = {m["name"]: m for m in worst["methods"]}
    stale = by.get("stale", {})
    checks: list[dict[str, Any]] = [{"target": "comm_fraction_uncompressed >= 0.9",
                                     "value": worst["comm_fraction_uncompressed"],
                                     "steady_value": worst["steady_comm_fraction_uncompressed"],
                                     "met": (worst["comm_fraction_uncompressed"] or 0) >= TARGETS["comm_fraction"]}]
    for name in ("compact_int2", "compact_int2_warm8", "compact_lowrank"):
        m = by.get(name)
        if m is None:
            continue
        checks.append({"target": f"{name} speedup >= {TARGETS[name]:g}x", "value": m["speedup_vs_uncompressed"],
                       "steady_value": m["steady_speedup_vs_uncompressed"],
                       "projected_value": m[f"projected_{PROJECT_STEPS}_steps_speedup"],
                       "met": (m["speedup_vs_uncompressed"] or 0) >= TARGETS[name]})
        checks.append({"target": f"{name} latency / ideal <= {TARGETS['x_ideal']:g}", "value": m["x_ideal"],
                       "steady_value": m["steady_x_ideal"],
                       "met": m["x_ideal"] is not None and m["x_ideal"] <= TARGETS["x_ideal"]})
        checks.append({"target": f"{name} faster than stale", "value": _div(stale.get("latency_s"), m["latency_s"]),
                       "steady_value": _div(stale.get("steady_step_s"), m["steady_step_s"]),
                       "met": bool(stale) and m["latency_s"] < stale["latency_s"]})
    if overhead:
        checks.append({"target": f"PassthroughHook overhead <= {TARGETS['overhead_pct']:g}%",
                       "value": overhead["dispatch_overhead_pct"], "steady_value": overhead["e2e_overhead_pct"],
                       "met": overhead["dispatch_overhead_pct"] <= TARGETS["overhead_pct"]})
    return {"rate": worst["rate"], "value": "per image (all steps)", "steady_value": "per step after the warm-up step "
            "(overhead: end-to-end A/B instead)", "checks": checks}


def derive_overhead(raw: dict[str, Any], steps: int, rate: str) -> dict[str, Any]:
    """Hook overhead in % of the run: the dispatch cost per call x calls, and the end-to-end A/B."""
    t_pass = statistics.median(raw["latency_s"]["passthrough"])
    t_raw = statistics.median(raw["latency_s"]["raw"])
    per_call_s = (raw["hooked_call_us"] - raw["raw_call_us"]) * 1e-6
    calls = raw["hook_calls_per_image"]
    return {**raw, "rate": rate, "steps": steps, "passthrough_s": t_pass, "raw_s": t_raw,
            "e2e_overhead_pct": 100.0 * (t_pass - t_raw) / t_raw,
            "dispatch_us_per_call": per_call_s * 1e6, "hook_calls_per_step": calls / steps,
            "dispatch_overhead_pct": 100.0 * per_call_s * calls / t_raw, "target_pct": TARGETS["overhead_pct"]}


# ---- the whole bench ----------------------------------------------------------------------------


def _check_setup(hosts: int, model: str, rates: list[str], steps: int) -> None:
    from compact_hooks.launcher import netns

    if hosts < 2:
        raise ValueError(f"--hosts must be >= 2 (sequence parallel needs two ranks); got {hosts}")
    heads = MODELS[model]["heads"]
    if heads % hosts:
        raise ValueError(f"--model {model} has {heads} heads, which Ulysses cannot split over {hosts} hosts; "
                         f"use --hosts dividing {heads}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1; got {steps}")
    if not rates:
        raise ValueError("give at least one --rate (e.g. --rate 1gbit --rate 20mbit)")
    for r in rates:
        parse_rate(r)
    netns.check_available()
    netns.mpirun_path()


def run_bench(rates: list[str], hosts: int = 2, model: str = "medium", steps: int = DEFAULT_STEPS, seed: int = 0,
              lowrank: Optional[dict[str, Any]] = None, overhead_repeats: int = 1, timeout: float = 3600.0,
              echo: bool = True, burst: Optional[int] = None, ladder_steps: Optional[int] = None,
              auto_target: float = DEFAULT_AUTO_TARGET) -> dict[str, Any]:
    """Run the bench (see the module docstring) and return its result (the ``--json`` document)."""
    _check_setup(hosts, model, rates, steps)
    start = time.monotonic()
    lowrank = lowrank or lowrank_spec()
    fastest = max(rates, key=parse_rate)
    base = ["--model", model, "--steps", str(steps), "--seed", str(seed), "--lowrank", json.dumps(lowrank),
            "--auto-target", str(auto_target), "--timeout", str(timeout)]
    derived: list[dict[str, Any]] = []
    ladder = overhead = None
    for i, rate in enumerate(rates):
        extra = (["--single"] if i == 0 else []) + (
            ["--ladder", "--ladder-steps", str(ladder_steps or steps), "--overhead", str(overhead_repeats)]
            if rate == fastest and fastest not in rates[:i] else [])
        raw = run_rate(rate, hosts, [*base, *extra], timeout, echo, burst)
        derived.append(derive_rate(raw, steps))
        if "quality_ladder" in raw:
            ladder = {"rate": rate, "steps": ladder_steps or steps, "reference": "ulysses (uncompressed) of the same run",
                      "entries": raw["quality_ladder"]}
        if raw.get("overhead"):
            overhead = derive_overhead(raw["overhead"], steps, rate)
    share_single(derived)
    return {
        "bench": "e2e", "model": model_info(model), "hosts": hosts, "steps": steps, "seed": seed,
        "pipeline": PIPELINE_NOTE, "threads_per_rank": 1, "lowrank": lowrank,
        "timing": "latency_s: slowest rank's time from a barrier until the pipeline returned; "
                  "steady_step_s: median of the steps after the first (full-send warm-up) step",
        "wire_bytes": "what one rank sends for the attention collectives per step (ring/pairwise convention); "
                      "the output all-gather of the transformer (plain, not hooked) is not counted",
        "rates": derived, "quality_ladder": ladder, "overhead": overhead,
        "targets": assess(derived, overhead), "wall_s": time.monotonic() - start,
    }


# ---- output -------------------------------------------------------------------------------------


# ---- command line -------------------------------------------------------------------------------


def add_parser(kinds: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench e2e`` on ``compact-hooks bench``'s subparsers."""
    p = kinds.add_parser("e2e", help="end-to-end parallel inference across emulated hosts per link rate (root)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=2, help="emulated hosts = ranks (default 2)")
    p.add_argument("--rate", action="append", help="link rate of a tc tbf cap, e.g. 1gbit (repeatable)")
    p.add_argument("--model", choices=sorted(MODELS), default="medium")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps per image (default {DEFAULT_STEPS}: the medium bench at 1gbit, 100mbit and "
                        "20mbit then fits in 15 minutes on 2 shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lowrank-rank", type=int, default=32, help="rank of the lowrank codec (default 32)")
    p.add_argument("--auto-target", type=float, default=DEFAULT_AUTO_TARGET,
                   help=f"target_rel_error of compact_auto (default {DEFAULT_AUTO_TARGET})")
    p.add_argument("--overhead-repeats", type=int, default=1,
                   help="end-to-end A/B repeats of the overhead check (default 1; the per-call probe is the measure)")
    p.add_argument("--ladder-steps", type=int, help="steps of the quality ladder's runs (default: --steps)")
    p.add_argument("--burst", type=int, help="tbf bucket in bytes (default: 2 ms at the rate, at least 16 KiB)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per rate before the job is killed")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.add_argument("--out", help="write the JSON result to this file")
    p.add_argument("--plot", help="write the quality ladder's error-per-step plot (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    from compact_hooks.bench import e2e_usp

    e2e_usp.add_arguments(p)  # --mode usp --ranks-per-host N (compact_hooks.bench.e2e_usp)
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.mode == "usp":
        from compact_hooks.bench import e2e_usp

        return e2e_usp.main(args)
    if args.mode == "ring":
        from compact_hooks.bench import e2e_ring

        return e2e_ring.main(args)

    def plot(result: dict[str, Any]) -> None:
        if args.plot and result.get("quality_ladder"):
            plot_ladder(result["quality_ladder"], args.plot)

    return report(args, lambda: run_bench(args.rate or [], args.hosts, args.model, args.steps, args.seed,
                                          lowrank_spec(args.lowrank_rank), args.overhead_repeats, args.timeout,
                                          not args.quiet, args.burst, args.ladder_steps, args.auto_target),
                  format_result, plot)
