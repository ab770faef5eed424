"""USP across 2 emulated hosts x 2 ranks each (network namespaces, mpirun): the Ulysses groups form
on each host from the real hostnames, the ring crosses hosts, results match one process exactly,
and the link-aware hook compresses the inter-host hops only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from compact_hooks.launcher import netns  # noqa: E402

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
MARK = "@@RESULT "
TOL = 2e-5


@pytest.fixture(scope="module")
def ranks():
    try:
        netns.check_available()
    except netns.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    with netns.emulated_hosts(2, rate="200mbit") as hosts:
        argv = [netns.mpirun_path(), *hosts.mpirun_args(), "--bind-to", "none", *hosts.mpirun_ranks(2, 2),
                "-x", f"GLOO_SOCKET_IFNAME={hosts.ifname}", "-x", "OMP_NUM_THREADS=1",
                sys.executable, "-u", "-m", "tests.usp_workers"]
        try:
            done = hosts.run(argv, timeout=600, cwd=str(REPO))
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the USP job did not finish: {exc.stderr!s:.3000}")
        names = hosts.names
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert done.returncode == 0 and lines, f"mpirun exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return names, json.loads(lines[0][len(MARK):])["ranks"]


def test_two_ranks_on_each_emulated_host(ranks):
    names, res = ranks
    assert [r["hostname"] for r in res] == [names[0], names[0], names[1], names[1]]


def test_usp_parity_across_hosts(ranks):
    names, res = ranks
    for rank, r in enumerate(res):
        p = r["parity"]
        for key, got in p.items():
            if isinstance(got, dict) and "err" in got:
                assert got["err"] < TOL, f"rank {rank} {key}: USP != single process ({got['err']:.2e})"
                assert got["repeat"] == 0.0 and got["shape"]
        hosts_layout = p["flux:hosts"]
        assert hosts_layout["grid"] == [[0, 1], [2, 3]]  # Ulysses on each host, ring across
        assert sorted(hosts_layout["ulysses"]) == ([0, 1] if rank < 2 else [2, 3])
        assert sorted(hosts_layout["ring"]) == ([0, 2] if rank % 2 == 0 else [1, 3])


def test_link_classes_from_real_hostnames(ranks):
    names, res = ranks
    for r in res:
        links = r["links"]
        assert links["world_hosts"] == [names[0], names[0], names[1], names[1]]
        assert links["classes"] == {"intra": "intra_host", "inter": "inter_host"}
        assert links["exchanges"] == 1
        intra = links["links"]["intra_host"]
        assert intra["raw_bytes"] == intra["wire_bytes"] > 0
        assert all(links["exact"][f"intra{s}"] for s in range(3))
        only = links["model:inter_host"]
        assert only["intra_host"]["compression_ratio"] == 1.0 and only["inter_host"]["compression_ratio"] > 1.0
        assert 0.0 < links["model_err"]["inter_host"] < links["model_err"]["all"]
