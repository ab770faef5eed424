"""``compact-hooks report``: plot a ``stats.json`` written by ``compact-hooks run``.

    compact-hooks report out/stats.json --out out/report.png

Four panels: raw and wire bytes per layer, reconstruction error per layer (the hook's sampled
relative error), raw and wire bytes per step, and the latent error against the uncompressed
reference per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REQUIRED = ("per_layer", "per_step")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``compact-hooks`` command's subparsers."""
    p = subparsers.add_parser("report", help="plot wire bytes and error per layer and per step of a stats.json",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", help="stats.json written by `compact-hooks run`")
    p.add_argument("--out", help="PNG to write (default: report.png next to the stats file)")
    p.set_defaults(handler=main)
    return p


def load_stats(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: is it a stats.json of `compact-hooks run`?")
    return data


def _title(s: dict[str, Any]) -> str:
    q = s.get("quality") or {}
    parts = [str(s.get("model", "?")), f"{s.get('mode', '?')} x {s.get('world_size', '?')}",
             str(s.get("compressor", "?"))]
    if s.get("compression_ratio"):
        parts.append(f"{s['compression_ratio']:.2f}x fewer bytes")
    if q.get("psnr_db") is not None:
        parts.append(f"PSNR {q['psnr_db']:.1f} dB")
    return "  |  ".join(parts)


def plot(s: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = s["per_layer"]
    steps = s["per_step"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    fig.suptitle(_title(s), fontsize=11)

    ax = axes[0][0]
    x = range(len(layers))
    ax.bar([i - 0.2 for i in x], [e["raw_bytes"] / 1e6 for e in layers], width=0.4, label="raw")
    ax.bar([i + 0.2 for i in x], [e["wire_bytes"] / 1e6 for e in layers], width=0.4, label="wire")
    ax.set_title("bytes per layer (all ranks, all steps)")
    ax.set_ylabel("MB")
    ax.set_xticks(list(x), [e["layer"] for e in layers], rotation=60, ha="right", fontsize=7)
    ax.legend()

    ax = axes[0][1]
    errs = [e.get("rel_error") for e in layers]
    if any(v is not None for v in errs):
        ax.bar(list(x), [v or 0.0 for v in errs], color="tab:red")
        ax.set_xticks(list(x), [e["layer"] for e in layers], rotation=60, ha="right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no error samples\n(set stats.error_every > 0)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("relative reconstruction error per layer (sampled)")

    ax = axes[1][0]
    idx = list(range(len(steps)))
    ax.plot(idx, [e.get("raw_bytes", 0) / 1e6 for e in steps], marker="o", ms=3, label="raw")
    ax.plot(idx, [e.get("wire_bytes", 0) / 1e6 for e in steps], marker="o", ms=3, label="wire")
    ax.set_title("bytes per step (all ranks)")
    ax.set_xlabel("step")
    ax.set_ylabel("MB")
    ax.legend()

    ax = axes[1][1]
    lat = [(i, e.get("latent_rel_l2")) for i, e in enumerate(steps)]
    lat = [(i, v) for i, v in lat if v is not None and v > 0]
    if lat:
        ax.plot([i for i, _ in lat], [v for _, v in lat], marker="o", ms=3, color="tab:red")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no reference run\n(run without --no-reference)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("latent relative L2 error vs. uncompressed, per step")
    ax.set_xlabel("step")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    path = Path(args.stats)
    out = Path(args.out) if args.out else path.with_name("report.png")
    written = plot(load_stats(path), out)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    from compact_hooks.cli import run_one

    sys.exit(run_one("report", add_parser))
