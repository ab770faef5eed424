"""Text tables and the quality-ladder plot of ``compact-hooks bench e2e`` results."""

from __future__ import annotations

import math
from typing import Any, Optional

from .e2e_setup import COMPACT_METHODS, PROJECT_STEPS


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
