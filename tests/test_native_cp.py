"""diffusers' native context parallelism (enable_parallelism) with every collective routed through a hook.

A parity table on tiny random configs of the diffusers transformers with a ``_cp_plan`` that run on
CPU (Flux, Flux2, Wan, ChronoEdit, QwenImage, LTX; Helios in Ulysses 2 and ring 2): for Ulysses 2,
ring 2, unified 2x2 and ring 4 (4 ranks) and the uneven
``ulysses_anything`` / ``ring_anything``, PassthroughHook and the ``none`` codec give diffusers' own
native result bit for bit, int8 and int2 with error feedback stay within bounds over 6 sampling
steps, and no collective takes torch.distributed unchanged (``unrouted == 0``). One spawned process
group runs every model and layout of its world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port, run_ranks
from tests.native_workers import native_probe_worker, native_table_worker

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ["flux", "flux2", "wan", "chronoedit", "qwenimage", "ltx"]
STEPS = 6
# Largest relative L2 error of any step's model output against diffusers' native output (measured on
# these configs: int8 <= 7e-4, int2 <= 4e-3; bounds leave 3-5x room).
BOUNDS = {"int8": 3e-3, "int2": 2e-2}
# Helios: its _cp_plan names 40 blocks, so the tiny config has 40 and the error adds up over them
# (measured: int8 <= 2.4e-3, int2 <= 1.4e-2)
FAMILY_BOUNDS = {"helios": {"int8": 1e-2, "int2": 5e-2}}
# Compression ratio over the run (first step full sends included): int8 ~3.4-3.9, int2 ~7-10.
MIN_RATIO = {"int8": 3.0, "int2": 6.0}

LAYOUTS_2 = [
    {"ulysses_degree": 2},
    {"ring_degree": 2},
    {"ulysses_degree": 2, "ulysses_anything": True, "text": 7},
    # QwenImage builds a joint attention mask, which diffusers' ring_anything refuses.
    {"ring_degree": 2, "ring_anything": True, "text": 7, "families": ["flux", "flux2", "wan", "chronoedit", "ltx"]},
    # Helios (40 blocks, three gathers per block: the slowest) in the two basic layouts only
    {"ulysses_degree": 2, "families": ["helios"]},
    {"ring_degree": 2, "families": ["helios"]},
]
LAYOUTS_4 = [{"ulysses_degree": 2, "ring_degree": 2}, {"ring_degree": 4}]  # ring 4: three hops per block


@pytest.fixture(scope="module")
def table() -> dict:
    rows: dict = {}
    for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        results = run_ranks(native_table_worker, world, layouts, FAMILIES, STEPS)
        for rank, res in enumerate(results):
            rows.update({f"{name}@rank{rank}": row for name, row in res.items()})
    return rows


def _rows(table: dict, layout: str) -> dict:
    rows = {k: v for k, v in table.items() if k.startswith(layout + "/")}
    assert rows, f"no rows for {layout}"
    return rows


@pytest.mark.parametrize("layout", ["ulysses_degree=2", "ring_degree=2", "ulysses_degree=2,ring_degree=2", "ring_degree=4",
                                    "ulysses_degree=2,ulysses_anything=True,text=7",
                                    "ring_degree=2,ring_anything=True,text=7"])
def test_native_parity_table(table, layout):
    for name, row in _rows(table, layout).items():
        assert row["single_err"] < 1e-5, (name, row["single_err"])  # diffusers' native CP itself is right
        for hook in ("passthrough", "none"):
            assert row[hook]["equal"], (name, hook, row[hook]["err"])
        for hook, bound in FAMILY_BOUNDS.get(name.split("/")[1].split("@")[0], BOUNDS).items():
            assert 0.0 < row[hook]["err"] < bound, (name, hook, row[hook]["err"])
            assert row[hook]["ratio"] >= MIN_RATIO[hook], (name, hook, row[hook]["ratio"])
        for hook in ("passthrough", "none", "int8", "int2"):
            assert row[hook]["unrouted"] == 0, (name, hook, row[hook]["unrouted_ops"])
            assert row[hook]["routed"] > 0 and row[hook]["exact"] > 0, (name, hook)


def test_native_keys_name_what_they_carry(table):
    families = {"flux": "transformer_blocks.0.attn", "wan": "blocks.0.attn1"}
    for family, layer in families.items():
        ulysses = set(table[f"ulysses_degree=2/{family}@rank0"]["keys"])
        ring = set(table[f"ring_degree=2/{family}@rank0"]["keys"])
        unified = set(table[f"ulysses_degree=2,ring_degree=2/{family}@rank0"]["keys"])
        assert {f"{layer}:{r}" for r in "qkvo"} <= ulysses and not any(k.endswith(":kv") for k in ulysses)
        assert f"{layer}:kv" in ring and not any(k.endswith((":q", ":o")) for k in ring)
        assert {f"{layer}:{r}" for r in ("q", "k", "v", "kv", "o")} <= unified
    anything = set(table["ulysses_degree=2,ulysses_anything=True,text=7/flux@rank0"]["keys"])
    assert {"transformer_blocks.0.attn:q", "transformer_blocks.0.attn:sizes"} <= anything
    assert "transformer_blocks.0.attn:mask" in table["ulysses_degree=2/qwenimage@rank0"]["keys"]


def test_native_unrouted_counted_and_removed():
    for res in run_ranks(native_probe_worker, 2):
        assert res["unrouted"] == 2 and res["unrouted_ops"] == {"dist.all_reduce": 2}, res
        assert res["restored"]


@pytest.mark.parametrize("world,degrees", [(2, ["--ring-degree", "2"]),
                                           (4, ["--ulysses-degree", "2", "--ring-degree", "2"])])
def test_run_native_embedded_model(tmp_path, world, degrees):
    """`compact-hooks run --mode native` on CPU (gloo, torchrun): the embedded digits model, stats.json with
    the layout, compression ratio, PSNR against the exact native run and unrouted == 0."""
    config = tmp_path / "int2.json"
    config.write_text(json.dumps({"compact_hooks": {"compressor": "int2", "residual": "ef"}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
           str(free_port()), "-m", "compact_hooks.cli", "run", "--config", str(config), "--mode", "native", *degrees,
           "--steps", "8", "--prompt", "3 7", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["mode"] == "native" and stats["world_size"] == world and stats["unrouted"] == 0
    assert (stats["ulysses_degree"], stats["ring_degree"]) == ((1, 2) if world == 2 else (2, 2))
    assert stats["compression_ratio"] >= 6.0, stats["compression_ratio"]
    assert stats["quality"]["psnr_db"] is not None and stats["quality"]["psnr_db"] >= 35.0, stats["quality"]
    layers = {e["layer"] for e in stats["per_layer"]}
    assert {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"} <= layers, layers


def test_native_degrees_checked():
    from compact_hooks.integrations.diffusers.native_job import native_degrees

    assert native_degrees(None, None, 4) == (4, 1)
    assert native_degrees(None, 2, 4) == (2, 2) and native_degrees(2, None, 4) == (2, 2)
    with pytest.raises(ValueError, match="must equal the 4 ranks"):
        native_degrees(3, None, 4)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        native_degrees(None, None, 1)
