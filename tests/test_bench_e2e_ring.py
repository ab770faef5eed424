"""``compact-hooks bench e2e --mode ring``: a quick real run of the tiny model on three emulated hosts
(needs root and network namespaces; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from compact_hooks.launcher import netns

from compact_hooks.bench import e2e_ring


def test_bench_e2e_ring_tiny_across_three_hosts(tmp_path: Any) -> None:
    try:
        netns.check_available()
        netns.mpirun_path()
    except (netns.NetnsUnavailable, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    result = e2e_ring.run_ring_bench(["1gbit"], hosts=3, model="tiny", steps=4, timeout=300.0, echo=False)
    json.loads(json.dumps(result))  # valid JSON (no NaN/inf objects)
    rate = result["rates"][0]
    methods = {m["name"]: m for m in rate["methods"]}
    assert set(methods) | set(rate["missing_methods"]) == set(e2e_ring.ROWS)
    assert {"compute_only", "ring", "compact_int2_sync", "compact_int2", "stale"} <= set(methods)
    for m in methods.values():
        assert m["latency_s"] > 0 and {"wire_bytes_per_step", "psnr_db"} <= set(m), m
    ring = methods["ring"]["wire_bytes_per_step"]
    for name in ("compact_int2_sync", "compact_int2_always", "compact_int2"):
        m = methods[name]
        assert 0 < m["wire_bytes_per_step"] < ring, m  # compact_int2 compresses steps 0 and 1 at least
        assert 0.0 <= m["hidden_comm_fraction"] <= 1.0
    for name in ("compact_int2_sync", "compact_int2_always"):
        m = methods[name]
        assert m["first_hop_rel_error"] > 0 and math.isfinite(m["last_hop_rel_error"]), m
    chosen = methods["compact_int2"]  # plain_when_faster: every call site took its choice by step 3
    assert chosen["chosen_sites"] > 0 and 0 <= chosen["plain_sites"] <= chosen["chosen_sites"], chosen
    relay, per_hop = methods["compact_int2_always"], methods["compact_int2_sync"]
    assert relay["last_hop_rel_error"] == pytest.approx(relay["first_hop_rel_error"], rel=1e-9)
    assert per_hop["encode_calls"] == 2 * relay["encode_calls"]  # 3 ranks: 2 hops re-encoded vs once
    assert any(c["target"].startswith("compact_int2_always: last-hop") and c["met"] for c in result["targets"]["checks"])
