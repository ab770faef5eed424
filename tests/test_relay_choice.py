"""``plain_when_faster``: per relay call site, plain or compressed from measured times, the same on every rank."""

from __future__ import annotations

import pytest

import compact_hooks as ch
from tests import relay_choice_workers as W
from tests.distributed import run_ranks

SITES = ("blocks.0.attn:k", "blocks.1.attn:k")


def _choices(results: list[dict]) -> dict:
    choices = [r["choice"] for r in results]
    assert all(c == choices[0] for c in choices), f"the ranks took different choices: {choices}"
    assert sorted(choices[0]) == sorted(SITES), "a site took no choice by step 2"
    return choices[0]


def test_an_instant_link_sends_plain_from_the_decision_on():
    # the link measurement is given (0 s per byte: plain costs nothing); the codec time is measured
    results = run_ranks(W.choice_worker, 3, 0.0)
    for r in results:
        for step, row in enumerate(r["steps"]):
            for key in SITES:
                if step < 2:  # step 0 full, step 1 measured: the compressed path unchanged
                    assert row[key]["as_without"], (step, key)
                else:  # decided at step 2: the plain relay, exact
                    assert row[key]["exact"], (step, key)
        assert all(r["plain_hops"][f"{key}.hop{h}"] == 4 for key in SITES for h in (1, 2))
    assert all(c["plain"] for c in _choices(results).values())


def test_a_slow_link_keeps_compressing_bit_for_bit():
    results = run_ranks(W.choice_worker, 3, 1.0)  # 1 s per byte: the payload's bytes save more than the codec costs
    for r in results:
        assert all(row[key]["as_without"] for row in r["steps"] for key in SITES)
        assert not any(r["plain_hops"].values())
    choices = _choices(results)
    assert not any(c["plain"] for c in choices.values())
    assert all(c["plain_s"] > c["compressed_s"] for c in choices.values())


def test_a_probed_link_gives_one_choice_on_every_rank():
    results = run_ranks(W.choice_worker, 3, None)
    choices = _choices(results)
    for r in results:
        for key in SITES:
            plain = choices[key]["plain"]
            for step, row in enumerate(r["steps"]):
                assert row[key]["exact"] if plain and step >= 2 else row[key]["as_without"], (step, key)


def test_plain_when_faster_with_a_byte_budget_is_refused():
    with pytest.raises(ch.ConfigError, match="plain_when_faster"):
        ch.load_config({"compressor": {"name": "auto", "bytes_of": "int2"}, "plain_when_faster": True})
