"""Defects found in review (issue 19), each with a test that failed before its fix.

Expected results are computed locally from every rank's (deterministic) inputs.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_ranks


# -- defects 4-6: links: "inter_host" / LinkAwareHook (workers in tests/links_workers.py) ----------
def test_defect4_ranks_that_disagree_on_links_raise_protocol_error_on_every_rank():
    from tests import links_workers

    for rank, res in enumerate(run_ranks(links_workers.disagree_on_links, 2)):
        for case in ("config", "compress"):  # links: "inter_host" vs "all"; compress=(inter) vs (intra, inter)
            got = res[case]
            assert got["error"] == "ProtocolError", (rank, case, got)
            assert "they differ in: links" in got["msg"], (rank, case, got["msg"])


@pytest.mark.parametrize("worker", ["stalled_peer_config", "stalled_peer_hostnames"])
def test_defect5_link_aware_first_call_times_out_on_a_stalled_peer(worker, tmp_path):
    from tests import links_workers

    timeout_s = 2.0
    res = run_ranks(getattr(links_workers, worker), 2, str(tmp_path / "flag"), timeout_s)[0]
    assert res["error"] == "CollectiveTimeoutError", res
    assert f"timeout_s={timeout_s}" in res["msg"], res["msg"]
    assert res["elapsed_s"] < 3 * timeout_s + 5, res  # a behaviour check: the stalled peer waits up to 60 s


def test_defect6_per_link_bytes_are_the_inner_hooks_bytes():
    from tests import links_workers

    for res in run_ranks(links_workers.per_link_bytes, 2):
        wrapped, disabled = res["wrapped"], res["disabled"]
        assert wrapped["calls"] == disabled["calls"] == 6
        assert wrapped["link"] == wrapped["inner"] and wrapped["link"][1] < wrapped["link"][0]
        assert wrapped["ratio"] == wrapped["inner_ratio"] > 1.0
        assert wrapped["steps"] == wrapped["inner_steps"] and len(wrapped["steps"]) == 3
        assert disabled["link"] == disabled["inner"] == [0, 0]  # stats disabled: nothing counted, as inside
        assert disabled["ratio"] is None


def test_defect6_per_link_bytes_split_one_hook_serving_both_links():
    from tests import links_workers

    for rank, res in enumerate(run_ranks(links_workers.per_link_bytes_mixed, 3)):
        assert res["inter"] == res["want_inter"] and res["inter"][1] < res["inter"][0], res
        assert res["intra"] == res["want_intra"], res
        assert [a + b for a, b in zip(res["intra"], res["inter"])] == res["inner"] == res["step_sum"], res
        assert res["calls"] == {"intra_host": 6 if rank < 2 else 0, "inter_host": 12}, res
        assert res["keyless"], "the keyless calls must appear under the inner hook's own keys"
