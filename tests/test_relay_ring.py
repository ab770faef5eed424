"""The relay ring (issue 21 item 2): each rank's K/V block is encoded once per step and its payload
forwarded unchanged around the ring, the next hop in flight while the caller computes.

* exact: PassthroughHook, a float32 cast and lossless / full-send CompactHooks give the plain ring's
  blocks bit for bit (3 ranks);
* error: with int2 / auto (error feedback) the block of a source is bit-identical on every receiver,
  so the last hop's error equals the first hop's;
* encode once per step (the per-hop path encodes at every hop);
* overlap: hop 2 arrives while rank 0 still computes on hop 1's block (the per-hop path: it does not);
* the diffusers ring mode through the relay: exact with PassthroughHook, keys per hop unchanged.
"""

from __future__ import annotations

import pytest

from tests import relay_workers as W
from tests.distributed import run_ranks

WORLD = 3
TOL = 2e-5


def test_relay_is_the_plain_ring_bit_for_bit():
    for rank, res in enumerate(run_ranks(W.exact_worker, WORLD)):
        for name, r in res.items():
            assert r["problems"] == [], (rank, name, r["problems"])
            assert {f"blocks.0.attn:k.hop{h}" for h in (1, 2)} <= set(r["keys"]), (name, r["keys"])


@pytest.mark.parametrize("codec", ["int2", "auto"])
def test_last_hop_error_equals_first_hop_error(codec):
    results = run_ranks(W.error_worker, WORLD, codec)
    for name in ("relay", "per_hop"):
        assert all(r[name]["resyncs"] == 0 for r in results), name  # bases agree (verify_every 2)
    for step in range(W.STEPS):
        for src in range(WORLD):
            copies = {r["relay"]["blocks"][step][src] for rank, r in enumerate(results) if rank != src}
            assert len(copies) == 1, f"step {step}: source {src}'s block differs between its receivers"
    for rank, r in enumerate(results):
        for step in range(1, W.STEPS):  # step 0 is the full send: exact everywhere
            assert all(0.0 < e < 0.2 for e in r["relay"]["errors"][step]), (rank, step, r["relay"]["errors"])
        assert all(r["relay"]["errors"][0][h] == 0.0 for h in range(WORLD - 1))
        # every hop is sampled against the exact source block (error_every 1)
        assert all(r["relay"]["sampled"].get(f"blocks.0.attn:k.hop{h}", 0) == W.STEPS for h in (1, 2)), r["relay"]
    # per source, the relay's error is the same at hop 1 and hop 2 (one stream, decoded the same way)
    for step in range(1, W.STEPS):
        hop1 = sorted(r["relay"]["errors"][step][0] for r in results)
        hop2 = sorted(r["relay"]["errors"][step][1] for r in results)
        assert hop1 == hop2, (step, hop1, hop2)


def test_encode_runs_once_per_step():
    for res in run_ranks(W.encode_count_worker, WORLD):
        assert res["relay"][1:] == [1] * (W.STEPS - 1), res
        assert res["per_hop"][1:] == [WORLD - 1] * (W.STEPS - 1), res


def test_next_hop_is_in_flight_while_the_caller_computes():
    relay = run_ranks(W.overlap_worker, WORLD, False, 60.0)
    assert relay[0]["hop2_arrived_during_compute"], relay
    assert all(r["hop2"] < 0.2 for r in relay)
    per_hop = run_ranks(W.overlap_worker, WORLD, True, 2.0)  # the control: the next hop waits for the caller
    assert not per_hop[0]["hop2_arrived_during_compute"], per_hop


def test_diffusers_ring_mode_uses_the_relay():
    for res in run_ranks(W.diffusers_ring_worker, WORLD):
        assert max(res["passthrough"]["err"]) < TOL, res["passthrough"]
        assert max(res["per_hop_passthrough"]["err"]) < TOL
        for name in ("passthrough", "int2", "int2_per_hop"):
            assert "transformer_blocks.0.attn:k.hop2" in res[name]["keys"], (name, res[name]["keys"])
        assert 0.0 < max(res["int2"]["err"]) < 0.05, res["int2"]
        assert max(res["int2"]["err"][1:]) <= max(res["int2_per_hop"]["err"][1:]), res
