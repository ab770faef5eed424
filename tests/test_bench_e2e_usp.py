"""``bench e2e --mode usp`` on 2 emulated hosts x 2 ranks (tiny model, 2 steps): the JSON document's
keys, bytes per link class and the inter-host-only policy leaving intra-host bytes untouched."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from compact_hooks.launcher import netns  # noqa: E402

from compact_hooks.bench.e2e_usp import run_usp_bench  # noqa: E402

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def result():
    try:
        netns.check_available()
    except netns.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    return run_usp_bench(["50mbit"], hosts=2, per_host=2, model="tiny", steps=2, echo=False, timeout=600)


def test_document(result):
    assert result["mode"] == "usp" and result["ulysses_degree"] == 2 and result["ring_degree"] == 2
    (rate,) = result["rates"]
    assert rate["world_size"] == 4 and len(set(rate["rank_hosts"])) == 2
    assert [m["name"] for m in rate["methods"]] == ["compute_only", "usp", "usp_compress_all", "usp_inter_host"]
    for m in rate["methods"]:
        for key in ("latency_s", "wire_bytes", "raw_bytes", "speedup_vs_uncompressed", "psnr_db", "rel_l2", "links"):
            assert key in m, (m["name"], key)
        assert set(m["links"]) == {"intra_host", "inter_host"}
    assert {c["target"] for c in result["targets"]["checks"]} >= {"comm_fraction_uncompressed >= 0.9"}


def test_bytes_per_link_class(result):
    by = {m["name"]: m for m in result["rates"][0]["methods"]}
    assert by["compute_only"]["wire_bytes"] == 0.0
    for link in ("intra_host", "inter_host"):
        assert by["usp"]["links"][link]["compression_ratio"] == 1.0
        assert by["usp_compress_all"]["links"][link]["compression_ratio"] > 1.0
    only = by["usp_inter_host"]["links"]
    assert only["intra_host"]["raw_bytes"] == only["intra_host"]["wire_bytes"] == by["usp"]["links"]["intra_host"]["raw_bytes"]
    assert only["inter_host"]["compression_ratio"] > 1.0
    assert by["usp"]["rel_l2"] == 0.0 and by["usp_inter_host"]["rel_l2"] > 0.0
