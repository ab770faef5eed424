"""Stale exchanges: StaleHook with one key on two groups, and the compressed stale hook
(``"stale": true``: a CompactHook exchange used one step later, issue 21 item 3).

Real gloo ranks (tests/stale_workers.py): the stale result of step t equals the CompactHook's result
of step t-1 with the local part fresh (a fresh role's: that of step t), every stream's bases are
bit-identical on all ranks, and a call returns while its exchange is still in flight (a delayed peer).
"""

from __future__ import annotations

import pytest

import compact_hooks as ch
from compact_hooks.hooks.stale_compact import StaleCompactHook
from tests import stale_workers as W
from tests.distributed import run_ranks

OPS = ["all_gather", "all_to_all", "all_reduce", "ring_exchange"]


@pytest.mark.parametrize("hook", ["stale", "stale_compact"])
def test_one_key_on_a_sub_group_and_the_world(hook):
    """Ranks 0 and 1 call key "k" on their sub-group, then all three ranks on the world: each group's
    stale data and warm-up are its own (StaleHook keyed them by key alone: the world call of ranks
    0 and 1 got the sub-group's pending exchange and skipped the warm-up rank 2 did)."""
    results = run_ranks(W.shared_key_worker, 3, hook)
    assert results == [[], [], []], results


def test_config_selects_the_compressed_stale_hook():
    hook = ch.build_hook({"compressor": "int2", "stale": True})
    assert isinstance(hook, StaleCompactHook) and hook.fresh_roles == {"o"}
    assert ch.build_hook({"stale": True, "stale_fresh_roles": []}).fresh_roles == set()
    assert isinstance(ch.build_hook({"hook": "stale"}), ch.StaleHook)  # the uncompressed baseline is unchanged
    assert isinstance(ch.build_hook({"stale": True, "links": "inter_host"}).compressed, StaleCompactHook)
    with pytest.raises(ch.ConfigError) as info:
        ch.load_config({"hook": "stale", "stale": True})
    assert info.value.key_path == "compact_hooks.stale" and "hook \"compact\"" in str(info.value)
    with pytest.raises(ch.ConfigError) as info:
        ch.load_config({"stale": True, "base_device": "cpu"})
    assert info.value.key_path == "compact_hooks.stale"
    with pytest.raises(ch.ConfigError) as info:
        ch.load_config({"stale": True, "stale_fresh_roles": "o"})
    assert info.value.key_path == "compact_hooks.stale_fresh_roles"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("op", OPS)
def test_stale_result_is_the_previous_compressed_result(world, op):
    results = run_ranks(W.schedule_worker, world, op)
    for r in results:
        assert r["problems"] == [], r["problems"]
    digests = [r["digests"] for r in results]
    streams = {name for d in digests for name in d}
    assert streams, "no bases"
    for name in streams:  # every copy of a stream (sender's and receivers') is bit-identical
        assert len({d[name] for d in digests if name in d}) == 1, name
    assert results[0]["in_flight"] == 1  # the last step's exchange, until drained
    stats = results[0]["stats"]["x"]
    assert stats["calls"] == 6  # recorded at decode
    assert stats["wire_bytes"] < stats["raw_bytes"]  # compressed


def test_a_call_returns_while_its_exchange_is_in_flight():
    """Rank 1 computes (sleeps) before each call; rank 0's call of step t returns before rank 1 has
    even started its side of step t's exchange: the exchange overlaps the caller's compute."""
    delay = 1.0
    results = run_ranks(W.overlap_worker, 2, delay)
    mine, peer = results[0]["times"], results[1]["times"]
    for step, ((_, returned), (peer_began, _)) in enumerate(zip(mine, peer), start=1):
        assert returned < peer_began, f"step {step}: rank 0 waited for rank 1's exchange"


@pytest.mark.parametrize("world", [2, 3])
def test_ring_relay_serves_every_hop_from_the_previous_step(world):
    assert run_ranks(W.relay_worker, world) == [[]] * world
