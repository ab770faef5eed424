"""Reliability of the compressed collectives across real gloo processes: every failure ends in a
clear error or a recovery, never a silently wrong result.

Items (see docs/failure-behaviour.md): 2 NaN/Inf, 3 divergence, 5 protocol mismatch, 6 shapes,
7 soak, 8 overflow. Items 1 (config) and 4 (dead ranks) are in their own modules. One spawned group
serves each family of tests (module-scoped fixtures); the rank functions are in
``tests/reliability_workers.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests import reliability_workers as W
from tests.distributed import run_ranks

pytestmark = pytest.mark.reliability

WORLD = 3


@pytest.fixture(scope="module")
def faults() -> list[dict[str, Any]]:
    return run_ranks(W.faults_worker, WORLD)


@pytest.fixture(scope="module")
def protocol() -> list[dict[str, Any]]:
    return run_ranks(W.protocol_worker, WORLD)


@pytest.fixture(scope="module")
def overflow() -> list[dict[str, Any]]:
    return run_ranks(W.overflow_worker, 2)


@pytest.fixture(scope="module")
def soak() -> list[dict[str, Any]]:
    return run_ranks(W.soak_worker, 2)


def same_digests(per_rank: list[dict[str, str]]) -> dict[str, set[str]]:
    """Streams whose base hash differs between the ranks that hold them."""
    streams: dict[str, set[str]] = {}
    for digests in per_rank:
        for name, digest in digests.items():
            streams.setdefault(name, set()).add(digest)
    return {name: d for name, d in streams.items() if len(d) > 1}


# -- item 2: NaN / Inf ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", W.OPS)
def test_nonfinite_is_visible_for_one_step_and_never_enters_a_base(faults, op):
    """Rank 1 sends inf at the warm-up (full send) step, NaN at step 3, -inf at step 6. Receivers see
    the exact tensor at a full send and an all-NaN piece at a compressed step; bases stay finite and
    identical on every rank; the counter counts it; other steps keep the normal error."""
    received_flagged = 0
    for rank, r in enumerate(faults):
        clean, bad = r["nan"][(op, False)], r["nan"][(op, True)]
        assert clean["nonfinite"] == 0
        normal = max(s["err"] for s in clean["steps"][1:])
        for step, s in enumerate(bad["steps"]):
            where = f"{op} rank {rank} step {step}"
            assert s["shape_ok"] and s["bases_finite"], where
            for p in s["parts"]:
                if p["local"]:
                    assert p["local_exact"], f"{where}: the local piece is not the exact local input"
                elif not p["want_nonfinite"]:
                    assert p["state"] == "finite", f"{where}: a clean piece was poisoned"
                elif step == 0:
                    assert p["state"] == "mixed", f"{where}: a full send must carry the exact values"
                else:
                    assert p["state"] == "allnan", f"{where}: NaN/Inf was hidden ({p['state']})"
                    received_flagged += 1
            if step == 0:
                assert s["nonfinite_match"], f"{where}: full send changed where the non-finite values are"
            if step not in W.NAN_INJECT:
                assert s["err"] is not None and s["err"] <= 2 * normal + 1e-3, f"{where}: {s['err']} vs {normal}"
        flagged_here = rank == W.BAD_RANK or any(
            p["want_nonfinite"] and not p["local"] for s in bad["steps"] for p in s["parts"])
        assert (bad["nonfinite"] > 0) == flagged_here, f"{op} rank {rank}: nonfinite={bad['nonfinite']}"
    assert received_flagged > 0
    assert same_digests([r["nan"][(op, True)]["digests"] for r in faults]) == {}


# -- item 3: divergence --------------------------------------------------------------------------
def _wrong_steps(errors: list[float]) -> tuple[list[int], float]:
    normal = max(errors[1:W.DIV_AT])
    return [t for t, e in enumerate(errors) if e > 10 * normal + 0.05], normal


@pytest.mark.parametrize("op", W.OPS)
def test_divergence_detected_within_k_steps_and_resynced(faults, op):
    for rank, r in enumerate(faults):
        d = r["divergence"][(op, W.DIV_K)]
        wrong, normal = _wrong_steps(d["errors"])
        assert d["resyncs"] == 1, f"rank {rank}: {d['resyncs']} resyncs"
        assert any("diverged" in w and "resynchronised" in w for w in d["warnings"]), d["warnings"]
        if rank == W.BAD_RANK:
            assert wrong and wrong[0] == W.DIV_AT and len(wrong) <= W.DIV_K, f"wrong at steps {wrong}: {d['errors']}"
            assert wrong == list(range(wrong[0], wrong[-1] + 1))
        else:
            assert wrong == [], f"rank {rank}: {d['errors']}"
        after = d["errors"][W.DIV_AT + len(wrong):]
        assert all(e <= 2 * normal + 1e-3 for e in after), f"rank {rank} after the resync: {after}"
        if op != "all_reduce":  # all_reduce resyncs only its corrupted all_gather stage
            assert d["full_sends"] == 2
        assert d["bases_finite"]
    assert same_digests([r["divergence"][(op, W.DIV_K)]["digests"] for r in faults]) == {}


@pytest.mark.parametrize("op", W.OPS)
def test_divergence_persists_without_verify(faults, op):
    """The control: without verify_every the corrupted base is never repaired."""
    d = faults[W.BAD_RANK]["divergence"][(op, 0)]
    wrong, _ = _wrong_steps(d["errors"])
    assert wrong == list(range(W.DIV_AT, W.DIV_STEPS)) and d["resyncs"] == 0
    assert same_digests([r["divergence"][(op, 0)]["digests"] for r in faults]) != {}


# -- item 6: shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("op", W.OPS)
def test_new_shape_or_dtype_resets_the_channel(faults, op):
    """A batch or resolution change mid-request, a new resolution and dtype in the next request:
    the exchange at each change is a full send with the exact result, the next ones are compressed."""
    plan = W.shape_plan(WORLD)
    changes = [i for i, (req, _, shape, dtype) in enumerate(plan)
               if i == 0 or (req, shape, dtype) != (plan[i - 1][0], plan[i - 1][2], plan[i - 1][3])]
    for rank, r in enumerate(faults):
        rows = r["shapes"][op]["rows"]
        previous = 0
        for i, row in enumerate(rows):
            where = f"{op} rank {rank} row {i} {row['shape']} {row['dtype']}"
            assert row["same_shape"], where
            if i in changes:
                assert row["full_sends"] == previous + 1, where
                if op == "all_reduce":  # sums in float32, then rounds once: not bitwise equal to gloo's order
                    assert row["err"] < (5e-3 if "bfloat16" in row["dtype"] else 1e-6), where
                else:
                    assert row["exact"], where
            else:
                assert row["full_sends"] == previous and 0 < row["err"] < 0.05, where
            previous = row["full_sends"]
    assert same_digests([r["shapes"][op]["digests"] for r in faults]) == {}


def test_all_to_all_indivisible_dim0_is_a_clear_error(faults):
    for r in faults:
        info = r["shapes"]["indivisible"]
        for message in (info["error"], info["plain_error"]):
            assert message is not None and "divisible" in message and f"{2 * WORLD + 1} rows" in message
        assert 0 <= info["err_after"] < 0.5  # the key's state was untouched: the next exchange works
    assert same_digests([r["shapes"]["indivisible"]["digests"] for r in faults]) == {}


# -- item 5: protocol mismatch -------------------------------------------------------------------
@pytest.mark.parametrize("case", W.mismatch_cases(), ids=lambda c: c[0])
def test_protocol_mismatch_fails_on_every_rank(protocol, case):
    name, _, _, _, (ours, theirs) = case
    for rank, r in enumerate(protocol):
        result = r[name]
        assert result["error"] == "ProtocolError", f"rank {rank}: {result}"
        assert result["seconds"] < 5, f"rank {rank} took {result['seconds']:.1f} s"
        message = result["message"]
        assert ours in message and theirs in message, f"rank {rank}: {message}"
        assert "they differ in:" in message


@pytest.mark.parametrize("op", W.W_HEADER_OPS)
def test_header_mismatch_fails_on_every_rank(protocol, op):
    """Settings agree but one rank's payload headers carry another wire version: every rank raises
    the same error at once, also in all_to_all and ring_exchange, where only some ranks receive
    that rank's payloads (none is left waiting in its next collective)."""
    name = "header_only" if op == "all_gather" else f"header_only_{op}"
    messages = set()
    for rank, r in enumerate(protocol):
        result = r[name]
        assert result["error"] == "ProtocolError" and f"wire v{W.V + 2}" in result["message"], f"rank {rank}: {result}"
        assert result["seconds"] < 5, f"rank {rank} took {result['seconds']:.1f} s"
        messages.add(result["message"])
    assert len(messages) == 1, messages


def test_group_usable_after_protocol_errors(protocol):
    assert all(all(r["after"].values()) for r in protocol)


# -- item 8: overflow ----------------------------------------------------------------------------
IN_RANGE = {("float16", 6.0e4), ("float16", 6.5e4), ("bfloat16", 1.0e5)}
BOUNDS = {"int8": 0.02, "int4": 0.15, "int2": 0.5, "int1": 0.8, "int2cf": 0.6, "lowrank": 0.9}  # as test_collectives


def _codec_name(ci: int) -> str:
    codec = W.OVERFLOW_CODECS[ci]
    return codec if isinstance(codec, str) else codec["name"]


@pytest.mark.parametrize("ci", range(len(W.OVERFLOW_CODECS)), ids=_codec_name)
def test_overflow_stays_finite_and_bounded(overflow, ci):
    name = _codec_name(ci)
    for dtype, peak, base_dtype in W.OVERFLOW_CASES:
        for mode in ("ef", "ef2"):
            key = (ci, dtype, peak, base_dtype, mode)
            label = f"{name} {dtype} {peak:g} base {base_dtype} {mode}"
            for rank, r in enumerate(overflow):
                res = r[key]
                assert res["outputs_finite"] and res["bases_finite"] and res["nonfinite"] == 0, f"{label} rank {rank}"
                for op in W.OPS:
                    errors, stale = res["errors"][op], res["stale"][op]
                    # never worse than not sending anything new (a saturated codec is exactly that)
                    assert all(e <= s + 1e-3 for e, s in zip(errors[1:], stale[1:])), f"{label} {op}: {errors} {stale}"
                    if (dtype, peak) in IN_RANGE:
                        mean = sum(errors[1:]) / (len(errors) - 1)
                        assert mean < BOUNDS[name], f"{label} {op}: {mean}"
            assert same_digests([r[key]["digests"] for r in overflow]) == {}, label


@pytest.mark.parametrize("ci", [i for i in range(len(W.OVERFLOW_CODECS)) if _codec_name(i) != "lowrank"],
                         ids=lambda i: _codec_name(i))
def test_huge_values_compress_as_well_as_in_range(overflow, ci):
    """bfloat16 activations of 1e30: the error is what it is at 1e5 (the codecs are scale-free: their
    scales travel as bfloat16 for float32 residuals; as float16 they saturated and the stream went stale)."""
    for mode in ("ef", "ef2"):
        for op in W.OPS:
            for r in overflow:
                small = r[(ci, "bfloat16", 1.0e5, "input", mode)]["errors"][op][1:]
                huge = r[(ci, "bfloat16", 1.0e30, "input", mode)]["errors"][op][1:]
                assert sum(huge) <= 2 * sum(small) + 0.005 * len(huge), f"{op}: {huge} vs {small}"


def test_overflowing_all_reduce_sum_is_visible(overflow):
    """float16 inputs whose exact sum overflows: plain gives inf, compact a NaN; bases stay finite."""
    for r in overflow:
        rows = r["sum_overflow"]["rows"]
        assert all(row["want_inf"] and row["got_nonfinite"] and row["bases_finite"] for row in rows), rows
        assert r["sum_overflow"]["nonfinite"] > 0


# -- item 7: soak --------------------------------------------------------------------------------
def test_soak_memory_flat_no_state_across_requests_stats_consistent(soak):
    calls = W.expected_soak_calls()
    for rank, r in enumerate(soak):
        memory, rss = r["memory"], r["rss"]
        assert len(set(memory)) == 1 and memory[0] > 0, f"session memory changes: {memory[0]} -> {memory[-1]}"
        half = len(rss) // 2
        assert rss[-1] - rss[W.SOAK_WARM] < 8 << 20, f"RSS grew {(rss[-1] - rss[W.SOAK_WARM]) >> 10} KiB"
        assert rss[-1] - rss[half] < 1 << 20, f"RSS still growing: {(rss[-1] - rss[half]) >> 10} KiB in the second half"
        assert r["mismatched"] == [], f"requests differ from a fresh hook's: {r['mismatched'][:3]}"
        assert len(r["first_exact"]) == W.SOAK_REQUESTS * 3 and all(r["first_exact"])
        s = r["stats"]
        per_key = s["per_key"].values()
        assert s["calls"] == calls == sum(k["calls"] for k in per_key)
        assert s["full_sends"] == W.SOAK_REQUESTS * len(W.OPS) and all(k["full_sends"] == W.SOAK_REQUESTS for k in per_key)
        for field in ("raw_bytes", "wire_bytes"):
            assert s[field] == sum(k[field] for k in per_key) == sum(p[field] for p in s["per_step"]) > 0
        assert len(s["per_step"]) == W.SOAK_REQUESTS * W.SOAK_STEPS
        assert s["requests"] == W.SOAK_REQUESTS and s["resyncs"] == 0 and s["nonfinite"] == 0 and s["warnings"] == []
        assert s["wire_bytes"] < s["raw_bytes"]
        print(f"soak rank {rank}: {r['seconds']:.1f} s, session memory {memory[0]} B (constant), RSS "
              f"{rss[0] >> 10} KiB first, {rss[W.SOAK_WARM] >> 10} KiB at request {W.SOAK_WARM}, {rss[-1] >> 10} KiB last")
    assert same_digests([r["digests"] for r in soak]) == {}


def test_soak_tiny_diffusers_model():
    """The same through a tiny FLUX transformer made sequence parallel by the diffusers integration
    (requests and steps marked by the integration from the timesteps)."""
    pytest.importorskip("diffusers")
    steps = 3
    results = run_ranks(W.diffusers_soak_worker, 2, W.SOAK_REQUESTS, steps)
    for rank, r in enumerate(results):
        memory, rss, s = r["memory"], r["rss"], r["stats"]
        assert len(set(memory)) == 1 and memory[0] > 0, f"session memory changes: {memory[0]} -> {memory[-1]}"
        half = len(rss) // 2
        assert rss[-1] - rss[half] < 3 << 19, f"RSS grew {(rss[-1] - rss[half]) >> 10} KiB in the second half"
        assert r["mismatched"] == [], f"requests differ from a fresh hook's: {r['mismatched']}"
        keys = len(s["per_key"])
        assert keys > 0 and s["requests"] == W.SOAK_REQUESTS
        assert s["calls"] == W.SOAK_REQUESTS * steps * keys and s["full_sends"] == W.SOAK_REQUESTS * keys
        for field in ("raw_bytes", "wire_bytes"):
            assert s[field] == sum(k[field] for k in s["per_key"].values()) == sum(p[field] for p in s["per_step"])
        assert s["nonfinite"] == 0 and s["resyncs"] == 0
        print(f"diffusers soak rank {rank}: {r['seconds']:.1f} s, {keys} keys, session memory {memory[0]} B (constant), "
              f"RSS {rss[0] >> 10} KiB first, {rss[half] >> 10} KiB at request {half}, {rss[-1] >> 10} KiB last")
    assert same_digests([r["digests"] for r in results]) == {}
