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
import math
import os
import selectors
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from compact_hooks.bench import e2e_usp
from compact_hooks.launcher.netns import parse_rate

PROGRESS = "[bench e2e] "
MODELS: dict[str, dict[str, Any]] = {
    # hidden 768 = 12 x 64, 4 double + 8 single blocks, 32x32 latent patches (1024) + 64 text tokens
    "medium": {"heads": 12, "head_dim": 64, "layers": 4, "single_layers": 8, "text_tokens": 64, "size": 128},
    # hidden 256 = 4 x 64, 2 double + 4 single blocks, 16x16 latent patches (256) + 32 text tokens: a full
    # 20+ step schedule of every method fits a few minutes at slow link rates
    "small": {"heads": 4, "head_dim": 64, "layers": 2, "single_layers": 4, "text_tokens": 32, "size": 64},
    # hidden 64 = 4 x 16, 1 + 1 blocks, 8x8 patches (64) + 8 text tokens: for tests
    "tiny": {"heads": 4, "head_dim": 16, "layers": 1, "single_layers": 1, "text_tokens": 8, "size": 32,
             "latent_channels": 4, "vae_blocks": (8, 8)},
}
DEFAULT_STEPS = 3
PROJECT_STEPS = 28  # FLUX.1-dev's default step count, for the projection from measured step times
# method -> its "compact_hooks" block ("lowrank" and "auto" stand for the bench's --lowrank / --auto-target specs)
COMPACT_METHODS: dict[str, dict[str, Any]] = {
    "compact_int2": {"compressor": "int2"},
    "compact_int2_warm8": {"compressor": "int2", "warmup_compressor": "int8"},
    "compact_int1": {"compressor": "int1"},
    "compact_lowrank": {"compressor": "lowrank"},
    "compact_auto": {"compressor": "auto"},
}
DEFAULT_AUTO_TARGET = 0.02
LADDER_CODECS = {"int2": "compact_int2", "int1": "compact_int1", "lowrank": "compact_lowrank"}
LADDER_MODES = ("none", "delta", "ef", "ef2")
METHOD_ORDER = ("single", "compute_only", "ulysses", "allgather", "stale", *COMPACT_METHODS)
TARGETS = {"comm_fraction": 0.9, "compact_int2": 4.0, "compact_int2_warm8": 8.0, "compact_lowrank": 12.0,
           "x_ideal": 1.3, "overhead_pct": 2.0}
PIPELINE_NOTE = ("diffusers FluxPipeline(output_type='latent'): FlowMatchEuler scheduler, random prompt embeds, "
                 "no VAE decode; quality on the final packed latent")
def lowrank_spec(rank: int = 32, factor_bits: int = 4) -> dict[str, Any]:
    """The low-rank codec the bench uses (a fresh dict)."""
    return {"name": "lowrank", "rank": rank, "factor_bits": factor_bits}


def model_info(model: str) -> dict[str, Any]:
    """What the named model is (tokens, hidden size, blocks)."""
    m = MODELS[model]
    image_tokens = (m["size"] // 4) ** 2  # FluxPipeline: VAE factor 2, then 2x2 packing
    return {"name": model, "hidden": m["heads"] * m["head_dim"], "heads": m["heads"], "head_dim": m["head_dim"],
            "double_blocks": m["layers"], "single_blocks": m["single_layers"], "image_tokens": image_tokens,
            "text_tokens": m["text_tokens"], "tokens": image_tokens + m["text_tokens"],
            "height": m["size"], "width": m["size"], "weights": "random (seeded), float32"}


# ---- one rate: an mpirun across emulated hosts --------------------------------------------------


def _worker_argv(hosts: Any, n: int, args: list[str]) -> list[str]:
    from compact_hooks.launcher import netns

    return [netns.mpirun_path(), *hosts.mpirun_args(), "--bind-to", "none", "-np", str(n),
            "--hostfile", str(hosts.hostfile_for(n)), "-x", f"GLOO_SOCKET_IFNAME={hosts.ifname}",
            "-x", "OMP_NUM_THREADS=1", "-x", "MKL_NUM_THREADS=1",
            sys.executable, "-u", "-m", "compact_hooks.bench.e2e_worker", *args]


def _pump(proc: subprocess.Popen, timeout: float, echo: bool) -> str:
    """Read the job's output until it exits; echo progress lines; return the last lines. Kills the job
    (and raises) after ``timeout`` seconds."""
    from compact_hooks.launcher import netns

    tail: deque[str] = deque(maxlen=60)
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                netns.kill_group(proc)
                proc.wait(timeout=30)
                raise TimeoutError(f"the bench job did not finish within {timeout:.0f} s (raise --timeout); "
                                   f"last output:\n" + "\n".join(tail))
            if not sel.select(timeout=min(left, 5.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                if echo and line.startswith(PROGRESS):
                    print(line, file=sys.stderr, flush=True)
    proc.wait()
    return "\n".join(tail)


def run_rate(rate: str, n_hosts: int, worker_args: list[str], timeout: float, echo: bool,
             burst: Optional[int] = None) -> dict[str, Any]:
    """Create ``n_hosts`` emulated hosts capped at ``rate`` (tbf bucket of ``burst`` bytes, default
    ``netns.auto_burst``), run the worker on them, return its JSON."""
    from compact_hooks.launcher.netns import emulated_hosts

    with emulated_hosts(n_hosts, rate=rate, burst=burst) as hosts:
        result_path = hosts.workdir / "result.json"
        argv = _worker_argv(hosts, n_hosts, [*worker_args, "--rate", rate, "--result", str(result_path)])
        proc = hosts.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(hosts.workdir))
        try:
            log = _pump(proc, timeout, echo)
        finally:
            if proc.poll() is None:
                from compact_hooks.launcher.netns import kill_group

                kill_group(proc)
                proc.wait(timeout=30)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the bench job at {rate} failed (mpirun exit code {proc.returncode}); "
                               f"last output:\n{log}")
        result = json.loads(result_path.read_text())
        result["tbf_burst_bytes"] = hosts.burst
        return result


# ---- derived numbers ----------------------------------------------------------------------------


def _steps_s(step_end_s: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *step_end_s], step_end_s)]


def _steady(step_end_s: list[float]) -> Optional[float]:
    """Median time of the steps after the first (the warm-up step sends full tensors)."""
    steps = _steps_s(step_end_s)[1:]
    return statistics.median(steps) if steps else None


def _project(step_s: list[float], steady: Optional[float], steps: int = PROJECT_STEPS) -> Optional[float]:
    """Seconds per image at ``steps`` steps: the measured first step plus ``steps - 1`` steady steps."""
    return step_s[0] + (steps - 1) * steady if step_s and steady is not None else None


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


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


def _f(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value * scale, spec)


def format_rate(r: dict[str, Any]) -> str:
    head = (f"{'method':<16}{'latency s':>10}{'step s':>8}{'MB/step':>9}{'ratio':>7}{'speedup':>8}{'ideal s':>9}"
            f"{'x ideal':>8}{'PSNR dB':>8}{'rel-L2':>9}{'codec%':>7}{'hook s':>8}{'other s':>8}")
    lines = [f"== rate {r['rate']} (tbf burst {r.get('tbf_burst_bytes')} B): comm fraction (uncompressed) "
             f"{_f(r['comm_fraction_uncompressed'], '.3f')} "
             f"(steady {_f(r['steady_comm_fraction_uncompressed'], '.3f')}), compute_only {r['compute_only_s']:.2f} s",
             head, "-" * len(head)]
    for m in r["methods"]:
        name = m["name"] + ("*" if m.get("measured_in_rate") not in (None, r["rate"]) else "")
        lines.append(
            f"{name:<16}{m['latency_s']:>10.2f}{_f(m['steady_step_s'], '.2f'):>8}"
            f"{_f(m['wire_bytes_per_step'], '.2f', 1e-6):>9}{_f(m.get('wire_ratio'), '.1f'):>7}"
            f"{_f(m['speedup_vs_uncompressed'], '.2f'):>8}{_f(m.get('ideal_s'), '.2f'):>9}{_f(m.get('x_ideal'), '.2f'):>8}"
            f"{_f(m['psnr_db'], '.1f'):>8}{_f(m['rel_l2'], '.1e'):>9}{_f(m['codec_share'], '.1f', 100):>7}"
            f"{m.get('hook_s', 0.0):>8.2f}{m['outside_hooks_s']:>8.2f}")
    runs = next((m.get("latency_runs_s") for m in r["methods"] if m["name"] == "compute_only"), None)
    if runs:
        lines.append(f"compute_only: median of {len(runs)} runs {', '.join(f'{t:.2f}' for t in runs)} s; "
                     "hook s / other s: rank 0's time inside the comm hooks / outside them (model compute)")
    if any(m.get("measured_in_rate") not in (None, r["rate"]) for m in r["methods"]):
        lines.append("* single: no communication, timed once in the first rate's run")
    compact = [m for m in r["methods"] if m["name"] in COMPACT_METHODS]
    if compact:
        lines.append("steady state (steps after the warm-up step): " + ", ".join(
            f"{m['name']} {_f(m['steady_speedup_vs_uncompressed'], '.2f')}x (x ideal {_f(m['steady_x_ideal'], '.2f')})"
            for m in compact))
        lines.append(f"projected to {PROJECT_STEPS} steps (first step + {PROJECT_STEPS - 1} steady steps): " + ", ".join(
            f"{m['name']} {_f(m[f'projected_{PROJECT_STEPS}_steps_speedup'], '.2f')}x" for m in compact))
    return "\n".join(lines)


def format_ladder(ladder: dict[str, Any]) -> str:
    lines = [f"== quality ladder at {ladder['rate']} ({ladder['steps']} steps; rel-L2 of the latent after each step "
             f"vs uncompressed Ulysses)", f"{'codec':<9}{'residual':<9}{'PSNR dB':>8}{'rel-L2':>10}  per step"]
    for e in ladder["entries"]:
        steps = " ".join(_f(v, ".1e") for v in e.get("per_step_rel_l2") or [])
        lines.append(f"{e['codec']:<9}{e['residual']:<9}{_f(e.get('psnr_db'), '.1f'):>8}"
                     f"{_f(e.get('rel_l2'), '.2e'):>10}  {steps}")
    return "\n".join(lines)


def format_overhead(o: dict[str, Any]) -> str:
    return (f"== overhead at {o['rate']}: PassthroughHook {o['dispatch_us_per_call']:.1f} us/call over a raw "
            f"all_to_all_single x {o['hook_calls_per_step']:.0f} calls/step = {o['dispatch_overhead_pct']:.3f}% of the "
            f"run; end to end (median of {len(o['latency_s']['raw'])}): passthrough {o['passthrough_s']:.2f} s vs raw "
            f"{o['raw_s']:.2f} s = {o['e2e_overhead_pct']:+.2f}% (noise-limited)")


def format_targets(t: dict[str, Any]) -> str:
    lines = [f"== targets at {t['rate']} (value per image; in brackets per steady step)"]
    for c in t["checks"]:
        projected = f" ({PROJECT_STEPS} steps projected: {c['projected_value']:.3f})" if c.get("projected_value") else ""
        lines.append(f"{'MET ' if c['met'] else 'MISS'} {c['target']:<45} {_f(c['value'], '.3f')} "
                     f"[{_f(c['steady_value'], '.3f')}]{projected}")
    return "\n".join(lines)


def format_result(result: dict[str, Any]) -> str:
    m = result["model"]
    parts = [f"bench e2e: {result['hosts']} emulated hosts, model {m['name']} (hidden {m['hidden']}, "
             f"{m['double_blocks']}+{m['single_blocks']} blocks, {m['tokens']} tokens), {result['steps']} steps, "
             f"1 torch thread per rank; {result['pipeline']}"]
    parts += [format_rate(r) for r in result["rates"]]
    if result.get("quality_ladder"):
        parts.append(format_ladder(result["quality_ladder"]))
    if result.get("overhead"):
        parts.append(format_overhead(result["overhead"]))
    if result.get("targets"):
        parts.append(format_targets(result["targets"]))
    parts.append(f"wall time {result['wall_s']:.0f} s")
    return "\n\n".join(parts)


def plot_ladder(ladder: dict[str, Any], path: str) -> None:
    """One panel per codec: rel-L2 of the latent after each step, one line per residual mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    codecs = list(dict.fromkeys(e["codec"] for e in ladder["entries"]))
    fig, axes = plt.subplots(1, len(codecs), figsize=(4.5 * len(codecs), 3.6), squeeze=False, sharey=True)
    for ax, codec in zip(axes[0], codecs):
        for e in (e for e in ladder["entries"] if e["codec"] == codec):
            errs = e.get("per_step_rel_l2") or []
            ax.plot(range(len(errs)), [v if v and v > 0 else float("nan") for v in errs], marker="o", label=e["residual"])
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(codec)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("rel-L2 of latent vs uncompressed")
    axes[0][0].legend(title="residual")
    fig.suptitle(f"error per step at {ladder['rate']} (step 0 sends full tensors: error 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    e2e_usp.add_arguments(p)  # --mode usp --ranks-per-host N (compact_hooks.bench.e2e_usp)
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    from compact_hooks.launcher.netns import NetnsUnavailable

    if args.mode == "usp":
        return e2e_usp.main(args)
    try:
        result = run_bench(args.rate or [], args.hosts, args.model, args.steps, args.seed,
                           lowrank_spec(args.lowrank_rank), args.overhead_repeats, args.timeout, not args.quiet,
                           args.burst, args.ladder_steps, args.auto_target)
    except (NetnsUnavailable, ValueError, FileNotFoundError) as exc:  # setup: what to change
        print(f"compact-hooks bench e2e: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:  # a failed job: its message holds the log's tail
        print(f"compact-hooks bench e2e: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot and result.get("quality_ladder"):
        plot_ladder(result["quality_ladder"], args.plot)
    print(text if args.json else format_result(result))
    return 0
