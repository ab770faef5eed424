"""``plain_when_faster``: per relay call site, plain or compressed from measured times, the same on every rank."""

from __future__ import annotations

import pytest

import compact_hooks as ch
from tests import relay_choice_workers as W
from tests.distributed import run_ranks

SITES = W.SITES


def _choices(results: list[dict]) -> dict:
    choices = [r["choice"] for r in results]
    assert all(c == choices[0] for c in choices), f"the ranks took different choices: {choices}"
    assert sorted(choices[0]) == sorted(SITES), "a site took no choice"
    return choices[0]


def _same_blocks_on_every_receiver(results: list[dict]) -> None:
    for step in range(W.STEPS):
        for key in SITES:
            seen: dict[int, set] = {}
            for r in results:
                for src, blob in r["steps"][step][key]["blocks"].items():
                    seen.setdefault(src, set()).add(blob)
            assert all(len(v) == 1 for v in seen.values()), (step, key)


def test_a_slow_link_decides_without_a_trial_and_keeps_compressing_bit_for_bit():
    # 1 s per byte (given, not probed): the plain hops' bound exceeds the measured compressed spans
    results = run_ranks(W.choice_worker, 3, 1.0)
    for r in results:
        assert all(row[key]["as_without"] for row in r["steps"] for key in SITES)
        assert not any(r["plain_hops"].values())
    choices = _choices(results)
    assert all(not c["plain"] and c["plain_bound_s"] > c["compressed_s"] for c in choices.values())


def test_an_instant_link_trials_plain_and_every_rank_takes_the_same_choice():
    # 0 s per byte (given): the bound cannot rule plain out, so step 2 is a plain trial (exact); from
    # step 3 on the measured spans decide, the same on every rank: plain (exact) or compressed, whose
    # stream resumes in lock step from the bases of step 1
    results = run_ranks(W.choice_worker, 3, 0.0)
    choices = _choices(results)
    for r in results:
        for key in SITES:
            steps = [row[key] for row in r["steps"]]
            assert steps[0]["as_without"] and steps[1]["as_without"]  # step 0 full, step 1 measured
            assert steps[2]["exact"]  # the trial
            for row in steps[3:]:
                # compressed again: the residual of step 3 is against step 1's bases, about as good
                assert row["exact"] if choices[key]["plain"] else row["error"] <= 2 * row["error_without"], (key, row)
            assert {"plain_s", "compressed_s"} <= set(choices[key])
    _same_blocks_on_every_receiver(results)


def test_a_probed_link_gives_one_choice_on_every_rank():
    results = run_ranks(W.choice_worker, 3, None)
    choices = _choices(results)
    for r in results:
        for key in SITES:
            trial = "plain_s" in choices[key]
            for step, row in enumerate(r["steps"][:3]):
                assert row[key]["exact"] if trial and step == 2 else row[key]["as_without"], (step, key)
            for row in r["steps"][3:]:
                assert row[key]["exact"] if choices[key]["plain"] else row[key]["error"] <= 2 * row[key]["error_without"]
    _same_blocks_on_every_receiver(results)


def test_plain_when_faster_with_a_byte_budget_is_refused():
    with pytest.raises(ch.ConfigError, match="plain_when_faster"):
        ch.load_config({"compressor": {"name": "auto", "bytes_of": "int2"}, "plain_when_faster": True})
