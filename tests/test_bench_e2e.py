"""``compact-hooks bench e2e``: the pure derivations, and a quick real run of the tiny model across two
emulated hosts (needs root and network namespaces; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from compact_hooks.launcher import netns

from compact_hooks.bench import e2e as bench_e2e

METHODS = {"single", "compute_only", "ulysses", "allgather", "stale", "compact_int2", "compact_int2_warm8", "compact_int1",
           "compact_lowrank", "compact_auto", "compact_auto_at_int2", "naive_fp8"}


def test_parse_rate_understands_tc_units() -> None:
    assert netns.parse_rate("20mbit") == 20e6
    assert netns.parse_rate("1gbit") == 1e9
    assert netns.parse_rate("1mbps") == 8e6  # tc: bps units are bytes
    with pytest.raises(ValueError, match="not a tc rate"):
        netns.parse_rate("fast")


def _raw(rate: str) -> dict[str, Any]:
    def method(name: str, latency: float, wire: float, later: float) -> dict[str, Any]:
        return {"name": name, "latency_s": latency, "step_end_s": [latency / 2, latency], "wire_bytes": wire,
                "wire_bytes_later_step": later, "encode_s": 0.0, "decode_s": 0.0, "hook_s": 0.0,
                "psnr_db": None, "rel_l2": None}

    return {"rate": rate, "world": 2, "methods": [
        method("compute_only", 2.0, 0.0, 0.0), method("ulysses", 20.0, 80.0, 40.0),
        method("stale", 18.0, 80.0, 40.0), method("compact_int2", 6.0, 50.0, 10.0)]}


def test_derive_rate_computes_ratios_and_ideal_times() -> None:
    r = bench_e2e.derive_rate(_raw("20mbit"), steps=2)
    assert r["comm_fraction_uncompressed"] == pytest.approx(0.9)
    m = {x["name"]: x for x in r["methods"]}["compact_int2"]
    assert m["wire_ratio"] == pytest.approx(80 / 50)
    assert m["ideal_s"] == pytest.approx(2.0 + 18.0 / 1.6)
    assert m["x_ideal"] == pytest.approx(6.0 / m["ideal_s"])
    assert m["speedup_vs_uncompressed"] == pytest.approx(20 / 6)
    assert m["steady_wire_ratio"] == pytest.approx(4.0)
    assert m["wire_bytes_per_step"] == 25.0
    checks = bench_e2e.assess([r], None)["checks"]
    assert any(c["target"].startswith("compact_int2 faster than stale") and c["met"] for c in checks)


@pytest.mark.multinode
def test_bench_e2e_tiny_across_two_hosts(tmp_path: Any) -> None:
    try:
        netns.check_available()
        netns.mpirun_path()
    except (netns.NetnsUnavailable, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    result = bench_e2e.run_bench(["1gbit"], hosts=2, model="tiny", steps=2, overhead_repeats=1, timeout=120.0,
                                 echo=False)
    json.loads(json.dumps(result))  # valid JSON (no NaN/inf objects)
    assert len(result["rates"]) == 1
    rate = result["rates"][0]
    assert rate["rate"] == "1gbit"
    assert 0.0 < rate["compute_only_s"] and rate["comm_fraction_uncompressed"] is not None
    methods = {m["name"]: m for m in rate["methods"]}
    assert set(methods) == METHODS
    for m in methods.values():
        assert m["latency_s"] > 0, m
        assert {"latency_s", "wire_bytes_per_step", "wire_bytes_per_image", "psnr_db"} <= set(m)
    uncompressed = methods["ulysses"]["wire_bytes_per_step"]
    assert uncompressed > 0 and methods["allgather"]["wire_bytes_per_step"] > 0
    assert result["steps"] == 2
    for name in ("compact_int2", "compact_int2_warm8", "compact_int1", "compact_lowrank", "compact_auto",
                 "compact_auto_at_int2"):
        m = methods[name]
        assert 0 < m["wire_bytes_per_step"] < uncompressed, m
        assert m["psnr_db"] is not None and math.isfinite(m["psnr_db"]), m
        assert m["ideal_s"] > 0 and m["x_ideal"] > 0
    # the int8 first step sends less than the full one
    assert methods["compact_int2_warm8"]["wire_bytes_first_step"] < methods["compact_int2"]["wire_bytes_first_step"]
    # auto at int2's bytes: a steady step sends no more than int2's (the budget is met, never exceeded)
    assert 0 < methods["compact_auto_at_int2"]["wire_bytes_later_step"] <= methods["compact_int2"]["wire_bytes_later_step"]
    assert methods["stale"]["rel_l2"] > 0  # stale K/V really are stale after the warm-up step
    assert methods["single"]["rel_l2"] < 1e-4  # the parallel model computes what one process does
    ladder = result["quality_ladder"]["entries"]
    assert {(e["codec"], e["residual"]) for e in ladder} == {
        (c, r) for c in ("int2", "int1", "lowrank") for r in ("none", "delta", "ef", "ef2")}
    for e in ladder:
        assert len(e["per_step_rel_l2"]) == 2 and math.isfinite(e["psnr_db"])
    overhead = result["overhead"]
    assert overhead["hook_calls_per_step"] > 0 and math.isfinite(overhead["dispatch_overhead_pct"])
    assert "tiny" in bench_e2e.format_result(result)
    bench_e2e.plot_ladder(result["quality_ladder"], str(tmp_path / "ladder.png"))
    assert (tmp_path / "ladder.png").stat().st_size > 0
