"""Sequence-parallel diffusers transformers (compact_hooks.integrations.diffusers) on real gloo ranks.

Each fixture runs one spawned process group that performs many checks; the tests assert on its results.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tests.diffusers_workers import (  # noqa: E402
    native_worker,
    parity_and_errors_worker,
    parity_worker,
    pipeline_worker,
)
from tests.distributed import run_ranks  # noqa: E402

MODES = ["ulysses", "allgather", "ring"]
TOL = 2e-5

# (tag, family, model kwargs, input kwargs). Token counts in the "odd" cases don't divide 2 or 4.
TWO_RANK_CASES = [
    ("flux", "flux", {}, {}),
    ("flux-odd", "flux", {}, {"height": 3, "width": 5, "text": 5}),
    ("sd3", "sd3", {}, {}),
    ("sd3-odd", "sd3", {}, {"height": 5, "width": 3, "text": 7}),
    ("pixart", "pixart", {}, {}),
    ("pixart-odd", "pixart", {}, {"height": 6, "width": 6, "text": 5}),
    ("dit", "dit", {}, {}),
    ("dit-odd", "dit", {}, {"height": 6, "width": 6}),
    ("cogvideox", "cogvideox", {}, {}),
    ("cogvideox-rope-odd", "cogvideox", {"rotary": True}, {"height": 6, "width": 6, "text": 5}),
]
FOUR_RANK_CASES = [
    ("flux", "flux", {}, {}),
    ("flux-odd", "flux", {}, {"height": 3, "width": 3, "text": 3}),
    ("sd3-odd", "sd3", {}, {"height": 5, "width": 5, "text": 7}),
    ("cogvideox-odd", "cogvideox", {}, {"height": 6, "width": 6}),
]


@pytest.fixture(scope="module")
def parity2():
    return run_ranks(parity_and_errors_worker, 2, TWO_RANK_CASES, MODES)


@pytest.fixture(scope="module")
def pipeline2():
    return run_ranks(pipeline_worker, 2)


def _check_parity(results: list[dict], cases: list, world: int) -> None:
    for rank, res in enumerate(results):
        for tag, *_ in cases:
            for mode in MODES:
                r = res.get(f"{tag}:{mode}")
                assert r is not None, f"{tag}:{mode} did not run"
                assert r["shape"], f"rank {rank} {tag}:{mode}: output shape differs"
                assert r["swapped"] > 0, f"{tag}:{mode}: no processor was swapped"
                assert r["err"] < TOL, f"rank {rank} {tag}:{mode} x{world}: parallel != single ({r['err']:.2e})"
                assert r["repeat"] == 0.0, f"{tag}:{mode}: a second forward differs"
            removed = res[f"{tag}:removed"]
            assert removed["err"] == 0.0 and removed["stock"], f"{tag}: remove() did not restore the model"


def test_passthrough_parity_two_ranks(parity2):
    _check_parity([r["parity"] for r in parity2], TWO_RANK_CASES, 2)


def test_passthrough_parity_four_ranks():
    _check_parity(run_ranks(parity_worker, 4, FOUR_RANK_CASES, MODES), FOUR_RANK_CASES, 4)


def test_clear_errors_two_ranks(parity2):
    for res in (r["errors"] for r in parity2):
        assert "3 attention heads" in res["heads"] and "allgather" in res["heads"]
        assert "already parallelized" in res["twice"]
        assert "different inputs" in res["inputs"]


def test_pipeline_requests_and_exact_baseline(pipeline2):
    for res in pipeline2:
        assert res["class_wrapped"] and res["class_restored"]
        assert res["exact_vs_single"] < TOL


@pytest.mark.parametrize("mode", MODES)
def test_int2_pipeline(pipeline2, mode):
    for res in pipeline2:
        r = res[mode]
        assert r["finite"]
        assert r["err_a"] < 0.05 and r["err_b"] < 0.05, r  # bounded error over whole pipeline calls
        assert r["err_a"] > 0.0  # really compressed
        assert r["requests"] == 2  # each pipeline call began a request
        assert r["n_steps"] == 2 * 5
        assert r["ratio_compressed"] >= 7.0, r
        assert all(x < 1.01 for x in r["ratio_first"]), r  # first step of each request: full tensors
        assert r["full_sends"] == [2], r  # one full send per key per request (the resolution changed too)
        names = {"ulysses": ["qkv", "o"], "allgather": "kv", "ring": ["k.hop1", "v.hop1"]}[mode]  # Q, K, V: one call
        assert {f"transformer_blocks.0.attn:{n}" for n in names} <= set(r["keys"]), r["keys"]


def test_stale_hook_runs_and_differs(pipeline2):
    for res in pipeline2:
        assert res["stale"]["finite"]
        assert 0.0 < res["stale"]["err"] < 1.0


def test_native_context_parallel_routed():
    for res in run_ranks(native_worker, 2):
        assert res["patched"] and res["restored"]
        assert res["exact_err"] < TOL
        assert res["keys"][:4] == [f"transformer_blocks.0.attn:{n}" for n in "qkvo"]
        assert 0.0 < res["int2_err"] < 0.05
        assert res["int2_requests"] == 1
        assert res["int2_ratio_last"] >= 7.0
