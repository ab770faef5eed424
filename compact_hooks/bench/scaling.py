"""``compact-hooks bench scaling``: wire bytes and session memory against tokens, world size and layers.

Runs a random-weight FLUX-architecture transformer sequence parallel (Ulysses) on local gloo ranks
and compares the measured bytes with the formula of DESIGN.md §1: per rank and step, Ulysses moves
``blocks * 4 * (P-1)/P * (S/P) * hidden * itemsize`` bytes (Q, K, V in and O back), and a compact
session holds ``blocks * 4 * 2 * (P-1) * (S/P) * (hidden/P) * itemsize`` bytes of bases (a send and a
receive channel per peer and tensor). ``S/P`` rounds up: the integration pads uneven sequences.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from compact_hooks.launcher.local import run_ranks

from .options import spec_arg

HEADS, HEAD_DIM, TEXT = 12, 16, 12  # 12 heads: divisible by 2, 3 and 4 ranks


def ulysses_bytes_per_step(blocks: int, tokens: int, hidden: int, world: int, itemsize: int) -> int:
    """Bytes one rank sends per step in Ulysses sequence parallel (no compression)."""
    return blocks * 4 * (world - 1) * _shard(tokens, world) * hidden * itemsize // world


def session_bytes(blocks: int, tokens: int, hidden: int, world: int, itemsize: int) -> int:
    """Bytes of bases one rank holds for Ulysses with residual ``ef``."""
    return blocks * 4 * 2 * (world - 1) * _shard(tokens, world) * (hidden // world) * itemsize


def _shard(tokens: int, world: int) -> int:
    """Tokens per rank; a sequence the group does not divide is padded."""
    return -(-tokens // world)


def _worker(rank: int, world: int, cases: list[dict[str, Any]], compressor: Any, steps: int) -> list[dict[str, Any]]:
    import compact_hooks as ch
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import tiny_flux, tiny_inputs

    rows = []
    for case in cases:
        model = tiny_flux(heads=HEADS, head_dim=HEAD_DIM, layers=case["double"], single_layers=case["single"])
        side = case["side"]
        kwargs = tiny_inputs("flux", model, batch=1, height=side, width=side, text=TEXT)
        base_dtype, base_device = case.get("base", ("input", "input"))
        hook = ch.CompactHook({"compressor": compressor, "residual": "ef", "warmup_steps": 1,
                               "base_dtype": base_dtype, "base_device": base_device})
        mode = case.get("mode", "ulysses")
        degrees = {"ulysses_degree": case["ulysses_degree"], "ring_degree": world // case["ulysses_degree"]} \
            if mode == "usp" else {}
        handle = parallelize(model, None, mode, hook, **degrees)
        noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
        base = kwargs["hidden_states"]
        with torch.no_grad():
            hook.begin_request()
            for t in range(steps):
                kwargs["hidden_states"] = base + 0.05 * t * noise
                model(**kwargs)
        stats = hook.stats()
        session = hook.session
        handle.remove()
        last = stats["per_step"][-1]
        rows.append({**case, "tokens": side * side + TEXT, "raw_bytes_per_step": last["raw_bytes"],
                     "wire_bytes_per_step": last["wire_bytes"], "session_bytes": session.memory_bytes(),
                     "host_bytes": session.host_memory_bytes(), "window_peak_bytes": session.window_peak_bytes()})
    return rows


def bench_scaling(worlds: list[int], sides: list[int], blocks: list[tuple[int, int]], compressor: Any,
                  steps: int = 3) -> dict[str, Any]:
    hidden = HEADS * HEAD_DIM
    cases = [{"side": s, "double": d, "single": sg} for s in sides for d, sg in blocks]
    out = []
    for world in worlds:
        rows = run_ranks(_worker, world, cases, compressor, steps)[0]
        for row in rows:
            n_blocks = row["double"] + row["single"]
            # Flux attention runs on text + image tokens in every block.
            formula = ulysses_bytes_per_step(n_blocks, row["tokens"], hidden, world, 4)
            out.append({**row, "world": world, "blocks": n_blocks,
                        "formula_raw_bytes_per_step": formula,
                        "formula_session_bytes": session_bytes(n_blocks, row["tokens"], hidden, world, 4),
                        "ratio": row["raw_bytes_per_step"] / row["wire_bytes_per_step"]})
    return {"compressor": compressor, "hidden": hidden, "steps": steps, "rows": out}


def _print(result: dict[str, Any]) -> None:
    print(f"Ulysses, hidden {result['hidden']}, float32, compressor {result['compressor']}; bytes per rank per step")
    print(f"{'P':>2} {'tokens':>6} {'blocks':>6} {'raw':>10} {'formula':>10} {'wire':>9} {'ratio':>6} "
          f"{'session':>10} {'formula':>10}")
    for r in result["rows"]:
        print(f"{r['world']:>2} {r['tokens']:>6} {r['blocks']:>6} {r['raw_bytes_per_step']:>10} "
              f"{r['formula_raw_bytes_per_step']:>10} {r['wire_bytes_per_step']:>9} {r['ratio']:>6.2f} "
              f"{r['session_bytes']:>10} {r['formula_session_bytes']:>10}")


def main(args: argparse.Namespace) -> int:
    spec = spec_arg(args.compressor)
    args.world = args.world or [2, 3, 4]
    blocks = [(n // 3, n - n // 3) for n in args.blocks]
    result = bench_scaling(args.world, args.side, blocks, spec, args.steps)
    print(json.dumps(result, indent=2)) if args.json else _print(result)
    return 0
