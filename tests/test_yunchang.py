"""yunchang (xDiT's USP attention) through a CommHook, on real gloo ranks and unforked yunchang.

PassthroughHook must give yunchang's own output bit for bit (its CPU path is deterministic); every
all-to-all must run on yunchang's Ulysses group and every ring hop on its ring group, with keys
that say which; int2 with error feedback stays within a bound over drifting inputs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("yunchang")

from tests.distributed import run_ranks  # noqa: E402
from tests.yunchang_workers import yunchang_worker  # noqa: E402

LONG = ("long_basic_pytorch", "long_basic")


@pytest.fixture(scope="module")
def two():
    return run_ranks(yunchang_worker, 2, [(2, 1), (1, 2)])


@pytest.fixture(scope="module")
def four():
    return run_ranks(yunchang_worker, 4, [(2, 2)])


def _expected_calls(u: int, r: int) -> list[list]:
    calls = [["all_to_all", n, True, False] for n in ("k", "o", "q", "v")] if u > 1 else []
    if r > 1:
        calls += [["ring_exchange", n, False, True] for n in ("ring_k", "ring_v")]
    return sorted(calls)


@pytest.mark.parametrize("fixture,layouts", [("two", [(2, 1), (1, 2)]), ("four", [(2, 2)])])
def test_passthrough_is_bitwise_yunchangs_own_output(fixture, layouts, request):
    for rank, res in enumerate(request.getfixturevalue(fixture)):
        assert res["version"] == "0.6.4"
        for u, r in layouts:
            for name in LONG:
                got = res[f"{u}x{r}:{name}"]
                assert got["bitwise"], f"rank {rank} {u}x{r} {name}: hooked output differs from yunchang's"
                assert got["after"], f"{u}x{r} {name}: remove() did not restore yunchang's path"
                assert got["vs_full"] < 1e-5, f"{u}x{r} {name}: yunchang itself is off ({got['vs_full']:.1e})"
                assert got["unrouted"] == 0
                assert sorted(got["calls"]) == _expected_calls(u, r), (u, r, name, got["calls"])
                assert got["n_calls"] == (4 if u > 1 else 0) + 2 * (r - 1)


def test_ulysses_attention_is_routed_bitwise(two):
    for res in two:
        got = res["2x1:ulysses"]
        assert got["bitwise"] and got["after"] and got["unrouted"] == 0
        # its four all-to-alls on the Ulysses group (yunchang 0.6.4's torch path then rings over the
        # default group without a group argument: those hops are routed too)
        a2a = [c for c in got["calls"] if c[0] == "all_to_all"]
        assert sorted(c[1] for c in a2a) == ["k", "o", "q", "v"] and all(c[2] for c in a2a)


@pytest.mark.parametrize("fixture,layout", [("two", "2x1"), ("two", "1x2"), ("four", "2x2")])
def test_int2_error_feedback_stays_bounded(fixture, layout, request):
    for res in request.getfixturevalue(fixture):
        ef = res[f"{layout}:ef"]
        errors = ef["errors"]
        assert errors[0] == 0.0, "the warm-up step sends full tensors"
        assert 0.0 < max(errors) < 0.1, errors
        assert errors[-1] < 2.0 * errors[1], f"the error grows over the steps: {errors}"
        assert ef["ratio"] > 3.5
        assert all(k.startswith("blocks.0.attn:") for k in ef["keys"])
