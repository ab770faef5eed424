"""USP (Ulysses inside a group, ring across groups) and link-aware compression on 4 real gloo ranks.

The grid layout is a pure function (Hypothesis); parity, groups, keys, routing and stats run in one
spawned process group per fixture.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from compact_hooks.integrations.diffusers.usp import check_degrees, default_degrees, ring_sources, usp_grid  # noqa: E402

from tests.distributed import run_ranks  # noqa: E402
from tests.usp_workers import FULL_CASES, FULL_LAYOUTS, USP_CASES, link_property_worker, link_worker, usp_parity_worker  # noqa: E402

TOL = 2e-5
LAYOUTS = ["2x2", "2x2-interleaved", "4x1", "1x4"]


@pytest.fixture(scope="module")
def parity4():
    return run_ranks(usp_parity_worker, 4)


@pytest.fixture(scope="module")
def links4():
    return run_ranks(link_worker, 4)


def test_usp_matches_the_single_process_model(parity4):
    for rank, res in enumerate(parity4):
        for tag, *_ in USP_CASES:
            for layout in LAYOUTS if tag in FULL_CASES else FULL_LAYOUTS:
                r = res[f"{tag}:{layout}"]
                assert r["shape"], f"{tag}:{layout}: output shape differs"
                assert r["err"] < TOL, f"rank {rank} {tag}:{layout}: USP != single process ({r['err']:.2e})"
                assert r["repeat"] == 0.0, f"{tag}:{layout}: a second forward differs"
            assert res[f"{tag}:removed"], f"{tag}: remove() did not restore the model"


def test_usp_grid_follows_the_hosts(parity4):
    assert parity4[0]["flux:2x2"]["grid"] == [[0, 1], [2, 3]]
    assert parity4[0]["flux:2x2-interleaved"]["grid"] == [[0, 2], [1, 3]]  # hosts h0 = {0, 2}, h1 = {1, 3}
    for rank, res in enumerate(parity4):
        r = res["flux:2x2-interleaved"]
        assert rank in r["ulysses"] and rank in r["ring"]
        assert sorted(r["ulysses"]) == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert sorted(r["ring"]) == ([0, 1] if rank in (0, 1) else [2, 3])


def test_every_collective_uses_its_sub_group_and_says_which(parity4):
    for res in parity4:
        for layout in ("2x2", "2x2-interleaved"):
            kinds = res[f"flux:{layout}"]["kinds"]
            # [op, on the Ulysses group, on the ring group]
            for name in ("q", "k", "v", "o"):
                assert kinds[name] == [["all_to_all", True, False]], (layout, name, kinds[name])
            for name in ("ring_k", "ring_v"):
                assert kinds[name] == [["ring_exchange", False, True]], (layout, name, kinds[name])
        assert set(res["flux:4x1"]["kinds"]) == {"q", "k", "v", "o"}  # no ring hop
        assert set(res["flux:1x4"]["kinds"]) == {"ring_k", "ring_v"}  # no all-to-all


def test_usp_errors_say_what_to_change(parity4):
    errors = parity4[0]["errors"]
    assert "3 * 2 = 6" in errors["product"] and "4 ranks" in errors["product"]
    assert "mode='usp'" in errors["not_usp"]
    assert "2 attention heads" in errors["heads"] and "ulysses_degree" in errors["heads"]


def test_topology_exchanges_hostnames_once(links4):
    for rank, res in enumerate(links4):
        assert res["world_hosts"] == ["host0", "host0", "host1", "host1"]
        assert res["classes"] == {"intra": "intra_host", "inter": "inter_host"}
        assert res["world_class"] == "inter_host"
        assert res["exchanges"] == 1


def test_link_aware_hook_leaves_intra_host_bytes_untouched(links4):
    for rank, res in enumerate(links4):
        intra, inter = res["links"]["intra_host"], res["links"]["inter_host"]
        assert intra["calls"] == 3 and inter["calls"] == 3
        assert intra["raw_bytes"] == intra["wire_bytes"] > 0 and intra["compression_ratio"] == 1.0
        assert inter["wire_bytes"] < inter["raw_bytes"]
        assert all(res["exact"][f"intra{s}"] for s in range(3)), "intra-host results must be exact"
        assert res["exact"]["inter0"] and not res["exact"]["inter2"], "warm-up exact, then compressed"


def test_link_aware_usp_compresses_only_the_ring(links4):
    for res in links4:
        only = res["model:inter_host"]
        every = res["model:all"]
        assert only["intra_host"]["compression_ratio"] == 1.0
        assert only["inter_host"]["compression_ratio"] > 1.0
        assert every["intra_host"]["compression_ratio"] > 1.0
        assert only["inter_host"]["calls"] == every["inter_host"]["calls"] > 0
        assert 0.0 < res["model_err"]["inter_host"] < res["model_err"]["all"] < 0.5


def test_routing_follows_the_link_class_for_any_hosts_and_group():
    per_rank = run_ranks(link_property_worker, 4)
    seen = set()
    for records in per_rank:
        assert len(records) == len(per_rank[0]) > 0
        for r in filter(None, records):
            seen.add((r["expect"], r["compressed"]))
            assert r["link"] == r["expect"]
            assert r["other_calls"] == 0
            if r["compressed"]:
                assert r["inner_calls"] == 2 and r["wire"] < r["raw"]
            else:
                assert r["inner_calls"] == 0 and r["exact"] and r["wire"] == r["raw"] > 0
    assert len(seen) == 4, f"the examples did not cover every (link class, policy) outcome: {seen}"


hosts_st = st.integers(1, 4).flatmap(lambda n_hosts: st.lists(st.integers(0, n_hosts - 1), min_size=1, max_size=12))


@settings(max_examples=200, deadline=None)
@given(assignment=hosts_st, data=st.data())
def test_grid_is_a_partition_that_keeps_ulysses_groups_on_a_host(assignment, data):
    hosts = [f"n{h}" for h in assignment]
    world = len(hosts)
    U = data.draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    R = world // U
    grid = usp_grid(hosts, U, R)
    assert len(grid) == R and all(len(row) == U for row in grid)
    assert sorted(r for row in grid for r in row) == list(range(world))
    counts = Counter(hosts)
    if all(c % U == 0 for c in counts.values()):
        assert all(len({hosts[r] for r in row}) == 1 for row in grid)
    else:
        assert [r for row in grid for r in row] == list(range(world))


@settings(max_examples=200, deadline=None)
@given(assignment=hosts_st, data=st.data())
def test_ring_sources_follow_the_ring_groups_rank_order(assignment, data):
    """Simulate the ring exchange as torch.distributed runs it (a group ordered by rank, position p
    sends to p + 1): the row ring_sources names is the row of the block each rank holds after each hop."""
    hosts = [f"n{h}" for h in assignment]
    world = len(hosts)
    U = data.draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    R = world // U
    grid = usp_grid(hosts, U, R)
    row_of = {rank: i for i, row in enumerate(grid) for rank in row}
    for u in range(U):
        order = sorted(row[u] for row in grid)  # dist.new_group's order
        held = {rank: row_of[rank] for rank in order}  # the row whose K/V block each rank holds
        sources = {rank: ring_sources(grid, order, rank) for rank in order}
        for hop in range(R):
            assert all(sources[rank][hop] == held[rank] for rank in order), (grid, order, hop)
            held = {order[(p + 1) % R]: held[order[p]] for p in range(R)}
        assert all(sorted(s) == list(range(R)) for s in sources.values())
    with pytest.raises(ValueError, match="one rank of each row"):
        ring_sources(((0, 1), (2, 3)), [0, 1], 0)


def test_degrees():
    assert default_degrees(["a", "a", "b", "b"]) == (2, 2)
    assert default_degrees(["a", "a", "a"]) == (3, 1)
    assert default_degrees(["a", "b", "b"]) == (3, 1)
    with pytest.raises(ValueError, match="2 \\* 3 = 6"):
        check_degrees(2, 3, 4)
    with pytest.raises(ValueError, match="positive"):
        check_degrees(0, 4, 4)
