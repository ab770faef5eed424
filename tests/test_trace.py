"""Activation traces: ``compact-hooks run --record-trace`` on 2 ranks of the trained model, then
``compact-hooks bench trace`` replays them (bytes must equal what the hook really sent); the recorder
and the replay on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_hooks.bench import trace as bench_trace
from compact_hooks.bench.trace_io import TraceRecorder, load_manifest, read_streams, trace_patterns, write_manifest
from compact_hooks.hook import CollectiveCall, CommHook
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
INT2 = {"name": "int2", "group_size": 128}


class Echo(CommHook):
    """A one-rank hook that returns the tensor (what a collective over one rank gives)."""

    def __init__(self) -> None:
        self.calls = 0
        self.steps = 0

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        self.calls += 1
        return call.tensor

    def next_step(self) -> None:
        self.steps += 1


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 2-rank job of the trained model recording block 0's two keys (Q, K and V in one all-to-all at
    :qkv, then :o) and one single block's :qkv, 5 steps; the first step int8-coded (the default)."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("trace")
    config = root / "config.json"
    config.write_text(json.dumps({
        "compact_hooks": {"enabled": True, "hook": "compact", "compressor": INT2, "residual": "ef",
                          "warmup_steps": 1, "collectives": ["all_to_all", "all_gather", "ring_exchange"]},
        "trace": {"keys": ["transformer_blocks.0.attn:*", "single_transformer_blocks.1.attn:qkv"]}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "compact_hooks.integrations.diffusers.job", "--config", str(config), "--steps", "5",
           "--prompt", "3 8", "--no-reference", "--out", str(root / "out"),
           "--record-trace", str(root / "trace")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_recorded_manifest_and_shards(recorded):
    m = load_manifest(recorded / "trace")
    assert m["model"] == "embedded-flux-digits" and m["world_size"] == 2 and m["steps"] == 5
    assert sorted(m["keys"]) == ["single_transformer_blocks.1.attn:qkv", "transformer_blocks.0.attn:o",
                                 "transformer_blocks.0.attn:qkv"]
    assert all(k["op"] == "all_to_all" and k["dtype"] == "float32" and k["steps"] == 5 for k in m["keys"].values())
    assert [len(r["shards"]) for r in m["ranks"]] == [5, 5]
    streams = list(read_streams(recorded / "trace"))
    assert len(streams) == 6 and all([s for s, _ in ts] == [0, 1, 2, 3, 4] for _, _, ts in streams)
    for _, key, ts in streams:
        assert list(ts[0][1].shape) == m["keys"][key]["shape"]


def test_replay_sends_the_bytes_the_hook_sent(recorded):
    """Replaying int2/ef on block 0 gives exactly the raw and wire bytes the job's hook counted there
    (its first step coded by the recorded run's warm-up codec, int8)."""
    stats = json.loads((recorded / "out" / "stats.json").read_text())
    r = bench_trace.replay(str(recorded / "trace"), [INT2], ["ef"], ["transformer_blocks.0.attn:*"])["results"][0]
    layer = next(e for e in stats["per_layer"] if e["layer"] == "transformer_blocks.0.attn")
    assert (r["raw_bytes"], r["wire_bytes"]) == (layer["raw_bytes"], layer["wire_bytes"])
    exact = bench_trace.replay(str(recorded / "trace"), [INT2], ["ef"], ["transformer_blocks.0.attn:*"],
                               warmup_compressor=None)["results"][0]
    assert exact["raw_bytes"] == r["raw_bytes"] and exact["wire_bytes"] > r["wire_bytes"]  # an fp32 first step
    assert r["error"]["final"] is not None and 0 < r["error"]["final"] < 0.5


def test_replay_cli_json_reports_every_codec_and_mode(recorded, capsys):
    from compact_hooks.cli import main

    assert main(["bench", "trace", str(recorded / "trace"), "--json", "--keys", "*attn:qkv"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keys"] == ["single_transformer_blocks.1.attn:qkv", "transformer_blocks.0.attn:qkv"]
    assert out["warmup_compressor"] == "int8"  # the recorded run's config
    got = {(r["codec"], r["mode"]) for r in out["results"]}
    assert {("int2", "ef"), ("int2", "delta"), ("int1", "ef"), ("lowrank", "ef"), ("bf16", "delta")} <= got
    for r in out["results"]:
        assert set(r["per_key"]) == set(out["keys"])
        assert r["wire_bytes"] <= r["raw_bytes"] and r["ratio"] >= 1.0
        e = r["error"]
        assert e["mean"] <= e["max"] and e["final"] <= e["max"] and len(e["per_step"]) >= 4
    by = {(r["codec"], r["mode"]): r for r in out["results"]}
    assert by[("int2", "ef")]["ratio"] > 2.5  # 1 int8 + 4 compressed steps of 2-bit codes
    assert by[("int8", "ef")]["error"]["max"] < by[("int2", "ef")]["error"]["max"]


def test_replay_rejects_unknown_codecs_and_keys(recorded):
    with pytest.raises(Exception, match="int3"):
        bench_trace.replay(str(recorded / "trace"), ["int3"], ["ef"])
    with pytest.raises(ValueError, match="no recorded key"):
        bench_trace.replay(str(recorded / "trace"), ["int2"], ["ef"], ["nothing*"])


@settings(max_examples=15, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), steps=st.integers(1, 4),
       rows=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_recorder_round_trip_keeps_values_and_dtype(tmp_path_factory, dtype, steps, rows, seed):
    out = tmp_path_factory.mktemp("rec")
    g = torch.Generator().manual_seed(seed)
    inner = Echo()
    rec = TraceRecorder(inner, out, ["*:k", "all_gather#*"], max_steps=3)
    sent = []
    for _ in range(steps):
        k = torch.randn(rows, 8, generator=g).to(dtype)
        assert rec(CollectiveCall("all_to_all", k, key="blk:k")) is k
        rec(CollectiveCall("all_to_all", k, key="blk:q"))  # not recorded
        rec(CollectiveCall("all_gather", k[:1]))  # keyless: numbered per step
        sent.append(k.clone())
        rec.next_step()
    write_manifest(out, [rec.close()], model="test", world_size=1)
    assert inner.calls == 3 * steps and inner.steps == steps
    streams = {key: ts for _, key, ts in read_streams(out)}
    assert sorted(streams) == ["all_gather#1", "blk:k"]
    assert [s for s, _ in streams["blk:k"]] == list(range(min(steps, 3)))
    for (_, got), want in zip(streams["blk:k"], sent):
        assert got.dtype == dtype and torch.equal(got, want)
    assert load_manifest(out)["keys"]["blk:k"]["dtype"] == str(dtype).removeprefix("torch.")


def test_replay_error_feedback_beats_delta_on_a_drifting_stream():
    """A slowly drifting activation: without error feedback the receiver's error accumulates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    tensors = []
    for step in range(20):
        x = x + 0.1 * torch.randn(64, 128, generator=g)
        tensors.append((step, x.clone()))
    ef = bench_trace.replay_stream("int2", "ef", tensors)
    delta = bench_trace.replay_stream("int2", "delta", tensors)
    assert ef["wire_bytes"] == delta["wire_bytes"] < ef["raw_bytes"]
    assert ef["errors"][0] is None and delta["errors"][0] is None  # the full send is exact
    assert ef["errors"][-1] < 0.5 * delta["errors"][-1]
    lossless = bench_trace.replay_stream("fp16", "ef", [(s, t.half()) for s, t in tensors])
    assert lossless["wire_bytes"] == lossless["raw_bytes"] and set(lossless["errors"][1:]) == {0.0}


def test_trace_patterns_flag_config_default(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"compact_hooks": {}, "trace": {"keys": ["a*", "b"]}}))
    assert trace_patterns("x, y:*", cfg) == ["x", "y:*"]
    assert trace_patterns(None, cfg) == ["a*", "b"]
    assert trace_patterns(None, None) == ["*"]
    cfg.write_text(json.dumps({"trace": {"keys": [1]}}))
    with pytest.raises(ValueError, match="trace.keys"):
        trace_patterns(None, cfg)
    with pytest.raises(ValueError, match="pattern"):
        TraceRecorder(Echo(), tmp_path, [])
