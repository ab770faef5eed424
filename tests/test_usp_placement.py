"""USP on ring degrees 3, 4, 6 and 8 with round-robin and contiguous host placements and padded token
counts: exact (PassthroughHook) and within a bound (int2) against one process.

One spawned world of 6 and one of 8 gloo ranks run every placement of ``tests.usp_workers.PLACEMENTS``
of their size (hosts emulated by ``Topology(hostname)``). A ring group is ordered by global rank, which
is not the grid's row order on round-robin placements: the tests fail if the ring attention masks the
keys of the wrong grid row.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tests.distributed import run_ranks  # noqa: E402
from tests.usp_workers import PLACEMENT_INPUT, PLACEMENT_STEPS, PLACEMENTS, usp_placement_worker  # noqa: E402

TOL = 2e-5  # PassthroughHook: float32 rounding of the online-softmax merge only
INT2_BOUND = 0.01  # int2, every step: max |error| / max |reference| of the model output
WORLDS = sorted({len(hosts) for hosts, _, _ in PLACEMENTS.values()})


@pytest.fixture(scope="module")
def placements() -> dict[int, list]:
    return {world: run_ranks(usp_placement_worker, world) for world in WORLDS}


def _each(placements):
    for name, (hosts, _, _) in PLACEMENTS.items():
        for rank, res in enumerate(placements[len(hosts)]):
            yield name, rank, res[name]


def _columns(grid):
    return [[row[u] for row in grid] for u in range(len(grid[0]))]


def _not_a_rotation(col):
    s = sorted(col)
    return all(col != s[i:] + s[:i] for i in range(len(s)))


def test_placements_cover_the_hard_cases(placements):
    for name, (hosts, u, r) in PLACEMENTS.items():
        assert len(hosts) == u * r, name
        tokens = PLACEMENT_INPUT["height"] * PLACEMENT_INPUT["width"]
        assert tokens % len(hosts) and PLACEMENT_INPUT["text"] % len(hosts), f"{name}: no padding"
    # placements whose ring groups (global-rank order) are not a rotation of the grid's rows
    crossed = {name for name, rank, res in _each(placements) if any(_not_a_rotation(c) for c in _columns(res["grid"]))}
    assert {PLACEMENTS[n][2] for n in crossed} >= {3, 4}, crossed
    for name, rank, res in _each(placements):
        assert rank in res["ring"] and sorted(res["ring"]) == res["ring"]  # dist.new_group's order


def test_usp_is_exact_on_every_placement(placements):
    bad = [f"{name} rank {rank}: step {s} err {e:.2e}" for name, rank, res in _each(placements)
           for s, e in enumerate(res["plain"]) if not e < TOL]
    assert not bad, "USP (PassthroughHook) != single process:\n" + "\n".join(bad)


def test_int2_usp_is_bounded_on_every_placement(placements):
    worst = 0.0
    for name, rank, res in _each(placements):
        errs = res["int2"]
        assert len(errs) == PLACEMENT_STEPS
        assert all(e < INT2_BOUND for e in errs), f"{name} rank {rank}: int2 error {errs} over {INT2_BOUND}"
        worst = max(worst, *errs)
        raw, wire = res["int2_ring"]
        assert 0 < wire < raw, f"{name} rank {rank}: the ring hops were not compressed ({raw} raw, {wire} wire)"
    assert worst > 0, "int2 never changed the result"
    print(f"int2: largest relative error {worst:.2e} (bound {INT2_BOUND})")
