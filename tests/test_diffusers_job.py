"""``compact-hooks run`` end to end on 2 gloo ranks (torchrun), and ``compact-hooks report``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from compact_hooks.integrations.diffusers import job as run_job  # noqa: E402

from compact_hooks.bench import report  # noqa: E402
from tests.distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "diffusers_ulysses_int2.json"
KEYS = ("model", "mode", "world_size", "compressor", "steps", "raw_bytes", "wire_bytes", "compression_ratio",
        "latency_s", "quality", "per_layer", "per_step")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    run_job.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_parser_accepts_launcher_flags():
    args = _parser().parse_args(["run", "--config", str(CONFIG), "--local_rank=1", "--mode", "ring",
                                 "--height", "64", "--width", "32", "--no-reference"])
    assert args.local_rank == 1 and args.mode == "ring" and args.no_reference and args.handler is run_job.main


@pytest.fixture(scope="module")
def job_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "compact_hooks.integrations.diffusers.job", "--config", str(CONFIG), "--model", "random", "--steps", "4",
           "--height", "64", "--width", "64", "--out", str(out), "--seed", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_run_job_two_ranks_writes_png_and_stats(job_out):
    out, stdout = job_out
    stats = json.loads((out / "stats.json").read_text())
    assert all(k in stats for k in KEYS), sorted(stats)
    assert stats["world_size"] == 2 and stats["mode"] == "ulysses" and stats["compressor"] == "int2"
    assert stats["steps"] == 4 and len(stats["per_step"]) == 4
    assert stats["wire_bytes"] < stats["raw_bytes"]
    assert stats["per_step"][-1]["compression_ratio"] >= 7.0
    assert stats["quality"]["psnr_db"] >= 30.0 and stats["quality"]["rel_l2"] < 0.05
    assert {e["layer"] for e in stats["per_layer"]} >= {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    from PIL import Image

    with Image.open(out / "image.png") as img:
        assert img.size == (64, 64)
    assert (out / "reference.png").exists()
    assert "compression" in stdout and "PSNR" in stdout  # the closing table


def test_report_plots_stats(job_out, tmp_path):
    out, _ = job_out
    args = argparse.Namespace(stats=str(out / "stats.json"), out=str(tmp_path / "report.png"))
    assert report.main(args) == 0
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="per_layer"):
        report.load_stats(bad)
