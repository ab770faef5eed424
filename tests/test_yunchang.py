"""yunchang (xDiT's USP attention) through a CommHook, on real gloo ranks and unforked yunchang.

PassthroughHook must give yunchang's own output bit for bit (its CPU path is deterministic); every
all-to-all must run on yunchang's Ulysses group and every ring hop on its ring group, with keys
that say which; int2 with error feedback stays within a bound over drifting inputs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("yunchang")

from tests.distributed import run_ranks  # noqa: E402
from tests.yunchang_workers import yunchang_lifecycle_worker, yunchang_worker  # noqa: E402

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


@pytest.fixture(scope="module")
def lifecycle():
    return run_ranks(yunchang_lifecycle_worker, 2)


ULYSSES_KEYS = [f"blocks.0.attn:{n}" for n in ("q", "k", "v", "o")]


def test_inner_with_of_the_same_instance_keeps_the_outer_block_routed(lifecycle):
    for res in lifecycle:
        got = res["nesting"]
        assert got["keys_inner"] == ULYSSES_KEYS
        assert got["routed_after_inner"], "leaving the inner with un-routed yunchang inside the outer one"
        assert got["n_outer"] == 4 and got["keys_outer"] == ULYSSES_KEYS, got["keys_outer"]
        assert got["n_after"] == 0, "yunchang still routed after the outermost with"
        assert got["restored"] and got["bitwise"]


def test_a_reused_instance_keeps_its_keys_and_key_rules_across_requests(lifecycle):
    for res in lifecycle:
        got = res["reuse"]
        # attach() once, a with per step: every request keeps the attention's keys, so the plain rule
        # matches and the output is yunchang's own (a None key would get int2 from the second step on)
        assert got["keys"] == [sorted(ULYSSES_KEYS)] * 2, got["keys"]
        assert got["bitwise"] == [[True] * 3] * 2, got["bitwise"]


@pytest.mark.parametrize("layout,names", [("2x1", ("q", "k", "v", "o")), ("1x2", ("ring_k.hop1", "ring_v.hop1"))])
def test_two_threads_on_one_instance_keep_their_own_keys(lifecycle, layout, names):
    for res in lifecycle:
        got = res[f"threads_{layout}"]
        assert got["restored"], "yunchang still routed after both threads left the with"
        for t in ("t0", "t1"):
            mine = got[t]
            assert mine["error"] is None, mine["error"]
            assert mine["keys"] == [f"{t}.attn:{n}" for n in names] * 3, (t, mine["keys"])
            assert mine["own_group"] and mine["bitwise"]


def test_a_second_instance_cannot_route_while_the_first_does_and_each_keeps_its_keys(lifecycle):
    for res in lifecycle:
        got = res["two_instances"]
        assert got["error"] is not None and "already routed through another YunchangHooks" in got["error"]
        assert got["routed_a"], "the refused second instance disturbed the first one's routing"
        assert got["restored_after_a"] and got["restored"]
        assert got["keys_a"] == [f"a.attn:{n}" for n in ("q", "k", "v", "o")]
        assert got["keys_b"] == [f"b.attn:{n}" for n in ("q", "k", "v", "o")] * 2
        assert got["keys_b_detached"] == ["None"] * 4 and got["own_forward"]
        assert got["live_keys"] <= 1, "instances dropped after their with still key the module"
        assert got["bitwise"]


@pytest.mark.parametrize("codec", ["passthrough", "int2"])
def test_yunchangs_ring_keeps_its_overlap_through_the_hook(codec):
    """yunchang's ``batch_isend_irecv`` returns work handles in flight: rank 1 starts each hop only after
    rank 0's ``commit()`` returned, which a synchronous exchange inside ``commit()`` would never do."""
    from tests.yunchang_workers import yunchang_overlap_worker

    for rank, res in enumerate(run_ranks(yunchang_overlap_worker, 2, codec, 60.0)):
        assert res["commits"] == 3, res  # one hop per forward, 3 forwards
        if codec == "passthrough":
            assert all(res["bitwise"]), (rank, res)
        else:
            assert 0.0 < max(res["errors"][1:]) < 0.1, (rank, res)
        assert {"blocks.0.attn:ring_k.hop1", "blocks.0.attn:ring_v.hop1"} <= set(res["keys"]), res
