"""Ulysses with Q, K and V in one all-to-all (issue 21 item 4), on real gloo ranks
(tests/qkv_workers.py): the diffusers Ulysses core sends ``key:qkv`` and ``key:o`` (2 collectives per
attention instead of 4), bit-identical to the three separate calls of before under an exact hook;
compressed error stays bounded; rules that tell q, k, v apart keep the three calls.
(The DeepSpeed layer's fused call: tests/test_deepspeed_ulysses.py::test_keys_and_calls.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tests import qkv_workers as W  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

KEY = "blocks.0.attn"


@pytest.mark.parametrize("world", [2, 4])
def test_fused_equals_separate_calls_bit_for_bit(world):
    for res in run_ranks(W.parity_worker, world):
        for tokens, r in res.items():
            assert r["equal"], f"{world} ranks, {tokens} tokens: fused output differs from the separate calls"
            assert r["err"] < 2e-5, r
            assert r["fused_keys"] == [f"{KEY}:qkv", f"{KEY}:o"]  # 2 collectives per forward
            assert r["apart_keys"] == [f"{KEY}:q", f"{KEY}:k", f"{KEY}:v", f"{KEY}:o"]  # 4 before


@pytest.mark.parametrize("codec, bound", [("int8", 0.01), ("int2", 0.15)])
def test_compressed_error_bounded_fused_as_apart(codec, bound):
    fused, apart = (run_ranks(W.lossy_worker, 2, codec, fuse)[0] for fuse in (True, False))
    assert fused["keys"] == [f"{KEY}:o", f"{KEY}:qkv"]
    assert apart["keys"] == [f"{KEY}:k", f"{KEY}:o", f"{KEY}:q", f"{KEY}:v"]
    assert fused["errors"][0] < 1e-6 and max(fused["errors"]) < bound, fused["errors"]
    assert max(fused["errors"]) < 1.5 * max(apart["errors"]) + 1e-6, (fused["errors"], apart["errors"])
    # the same raw bytes; the fused call carries one header and fewer scales' padding, never more
    assert fused["raw"][f"{KEY}:qkv"] == sum(apart["raw"][f"{KEY}:{r}"] for r in "qkv")
    assert fused["wire"][f"{KEY}:qkv"] <= sum(apart["wire"][f"{KEY}:{r}"] for r in "qkv")


def test_role_rules_decide_whether_qkv_travel_together():
    res = run_ranks(W.rules_worker, 2)[0]
    apart = [f"{KEY}:q", f"{KEY}:k", f"{KEY}:v", f"{KEY}:o"]
    assert res["k_v_lowrank"]["keys"] == apart  # k, v get their own codec: three calls, as before
    assert res["q_k_v_without_qkv"]["keys"] == apart  # the fused key is not matched by that rule
    assert res["all_roles_plain"]["keys"] == [f"{KEY}:qkv", f"{KEY}:o"]
    assert res["all_roles_plain"]["plain"] == {f"{KEY}:qkv": 1, f"{KEY}:o": 0}  # the rule applies to qkv
    assert res["key_glob_plain"]["keys"] == [f"{KEY}:qkv", f"{KEY}:o"]
    assert res["key_glob_plain"]["plain"] == {f"{KEY}:qkv": 1, f"{KEY}:o": 1}
