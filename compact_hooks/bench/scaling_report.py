"""``compact-hooks bench scaling --preset NAME``: base memory and wire bytes of a real workload per
world size, mode and base option (the formulas of :mod:`.scaling_presets`), checked against
``Session.memory_bytes()`` / ``host_memory_bytes()`` / ``window_peak_bytes()`` and the stats' bytes
measured on a tiny FLUX-architecture model at small scale on local gloo ranks (``check``)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from compact_hooks.launcher.local import run_ranks

from .options import spec_arg
from .scaling import HEAD_DIM, HEADS, TEXT, _worker
from .scaling import main as main_classic
from .scaling_presets import BASE_OPTIONS, MODES, PRESETS, Preset, block_plan, feasible, memory, usp_degrees, wire

CHECK_SIDE, CHECK_BLOCKS, CHECK_STEPS = 8, (1, 1), 3


def preset_rows(preset: Preset, worlds: list[int], modes: list[str], compressor: Any, warmup: Any) -> list[dict[str, Any]]:
    """Base bytes per GPU (every base option) and wire bytes per GPU of ``preset`` for each world and mode."""
    rows = []
    for world in worlds:
        for mode in modes:
            why = feasible(mode, world, preset.heads)
            if why:
                rows.append({"world": world, "mode": mode, "skipped": why})
                continue
            plan = block_plan(mode, preset.tokens, preset.heads, preset.head_dim, world)
            bases = {name: memory(plan, preset.blocks, dt, dev) for name, (dt, dev) in BASE_OPTIONS.items()}
            row = {"world": world, "mode": mode, "bases": bases,
                   "int8_over_bf16": bases["int8"]["device"] / bases["bf16"]["device"],
                   **wire(plan, preset.blocks, compressor, warmup, preset.steps, 2)}
            if mode == "usp":
                row["degrees"] = list(usp_degrees(world, preset.heads))
            rows.append(row)
    return rows


def small_check(world: int, compressor: Any, modes: list[str], options: list[str],
                steps: int = CHECK_STEPS) -> dict[str, Any]:
    """Measure every mode and base option on ``world`` local gloo ranks (tiny FLUX model, float32
    activations) and compare with the formulas at that scale."""
    ulysses = 2 if world % 2 == 0 and world > 2 else world  # usp: a ring of at least two groups when possible
    double, single = CHECK_BLOCKS
    cases = [{"side": CHECK_SIDE, "double": double, "single": single, "mode": m, "option": o,
              "base": BASE_OPTIONS[o], "ulysses_degree": ulysses}
             for m in modes if not feasible(m, world, HEADS) for o in options]
    measured = run_ranks(_worker, world, cases, compressor, steps)[0]
    tokens = CHECK_SIDE * CHECK_SIDE + TEXT
    rows = []
    for row in measured:
        plan = block_plan(row["mode"], tokens, HEADS, HEAD_DIM, world, row["ulysses_degree"])
        dt, dev = row["base"]
        mem = memory(plan, double + single, dt, dev)
        bytes_ = wire(plan, double + single, compressor, None, steps, 4)
        got_device = row["window_peak_bytes"] if dev == "cpu" else row["session_bytes"]
        # relays keep K and V in flight together: their window formula is an upper bound, the rest exact
        bound = dev == "cpu" and any(k.op == "ring_exchange" for k in plan)
        rows.append({"mode": row["mode"], "option": row["option"], "measured_device_bytes": got_device,
                     "formula_device_bytes": mem["device"], "measured_host_bytes": row["host_bytes"],
                     "formula_host_bytes": mem["host"], "measured_raw_bytes_per_step": row["raw_bytes_per_step"],
                     "formula_raw_bytes_per_step": bytes_["raw_bytes_per_step"],
                     "measured_wire_bytes_per_step": row["wire_bytes_per_step"],
                     "formula_wire_bytes_per_step": bytes_["wire_bytes_per_step"],
                     "device_formula_is_bound": bound,
                     "rel_diff": max(0.0 if bound and got_device <= mem["device"] else _rel(got_device, mem["device"]),
                                     _rel(row["host_bytes"], mem["host"]),
                                     _rel(row["wire_bytes_per_step"], bytes_["wire_bytes_per_step"]))})
    return {"world": world, "side": CHECK_SIDE, "tokens": tokens, "hidden": HEADS * HEAD_DIM,
            "blocks": double + single, "steps": steps, "usp_degrees": [ulysses, world // ulysses], "rows": rows}


def _rel(a: int, b: int) -> float:
    return abs(a - b) / b if b else float(a != 0)


def bench_preset(name: str, worlds: list[int], modes: list[str], compressor: Any, warmup: Any = "int8",
                 check_world: int = 4, check_options: Optional[list[str]] = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    bad = [w for w in worlds if not 2 <= w <= 16]
    if bad:
        raise ValueError(f"--world takes world sizes 2 to 16 with --preset; got {bad}")
    preset = PRESETS[name]
    result = {"preset": {"name": name, "tokens": preset.tokens, "hidden": preset.hidden, "heads": preset.heads,
                         "blocks": preset.blocks, "steps": preset.steps, "note": preset.note},
              "compressor": compressor, "warmup_compressor": warmup, "activation_dtype": "bfloat16",
              "rows": preset_rows(preset, worlds, modes, compressor, warmup)}
    if check_world:
        result["check"] = small_check(check_world, compressor, modes, check_options or list(BASE_OPTIONS))
    return result


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def print_preset(result: dict[str, Any]) -> None:
    p = result["preset"]
    print(f"{p['name']}: {p['note']}; {p['tokens']} tokens, hidden {p['hidden']}, {p['blocks']} blocks, "
          f"{p['steps']} steps; compressor {result['compressor']}, first step {result['warmup_compressor']}; "
          "bf16 activations; GB per GPU (offloaded: GPU window / host)")
    names = list(BASE_OPTIONS)
    print(f"{'P':>2} {'mode':<9} " + " ".join(f"{n:>14}" for n in names)
          + f" {'raw/step':>9} {'wire/step':>9} {'wire/image':>10}")
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['world']:>2} {r['mode']:<9} n/a: {r['skipped']}")
            continue
        cells = [(_gb(b["device"]) if not b["host"] else f"{_gb(b['device'])}/{_gb(b['host'])}")
                 for b in (r["bases"][n] for n in names)]
        print(f"{r['world']:>2} {r['mode']:<9} " + " ".join(f"{c:>14}" for c in cells)
              + f" {_gb(r['raw_bytes_per_step']):>9} {_gb(r['wire_bytes_per_step']):>9} "
              f"{_gb(r['wire_bytes_per_image']):>10}")
    check = result.get("check")
    if check:
        worst = max(r["rel_diff"] for r in check["rows"])
        print(f"check at small scale ({check['world']} gloo ranks, {check['tokens']} tokens, hidden {check['hidden']}, "
              f"{check['blocks']} blocks, usp {check['usp_degrees'][0]}x{check['usp_degrees'][1]}): measured "
              f"Session.memory_bytes / host_memory_bytes / window_peak_bytes and wire bytes vs formula, largest "
              f"difference {100 * worst:.2f}% (<=: an offload window with relays, whose formula is a bound)")
        for r in check["rows"]:
            print(f"  {r['mode']:<9} {r['option']:<15} device {r['measured_device_bytes']:>9} "
                  f"({'<=' if r['device_formula_is_bound'] else 'formula'} {r['formula_device_bytes']:>9}) "
                  f"host {r['measured_host_bytes']:>9} "
                  f"(formula {r['formula_host_bytes']:>9}) wire {r['measured_wire_bytes_per_step']:>7} "
                  f"(formula {r['formula_wire_bytes_per_step']:>7})")


def main(args: argparse.Namespace) -> int:
    """``bench scaling``: ``--preset NAME`` here, else the measured Ulysses table of :mod:`.scaling`."""
    if not args.preset:
        return main_classic(args)
    spec = spec_arg(args.compressor)
    modes = args.mode or list(MODES)
    result = bench_preset(args.preset, args.world or [2, 4, 8, 16], modes, spec, check_world=args.check_world)
    print(json.dumps(result, indent=2)) if args.json else print_preset(result)
    return 0
