"""The `compact-hooks` command: compressors, bench codecs and bench drift print the documented JSON."""

import json
import subprocess
import sys

import pytest

from compact_hooks.cli import main


def run_json(capsys, *argv: str):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_compressors_json(capsys):
    rows = run_json(capsys, "compressors", "--json")
    names = {r["name"] for r in rows}
    assert {"int2", "int1", "int2cf", "lowrank", "topk", "nm", "none"} <= names
    assert next(r for r in rows if r["name"] == "int2")["params"] == {"group_size": 128}


def test_bench_codecs_json(capsys):
    out = run_json(capsys, "bench", "codecs", "--shape", "64,256", "--dtype", "float16", "--repeats", "2",
                   "--compressor", "int2", "--compressor", '{"name": "lowrank", "rank": 4, "factor_bits": 8}', "--json")
    assert out["memcpy_gbps"] > 0 and out["shape"] == [64, 256]
    rows = {r["name"]: r for r in out["codecs"]}
    assert set(rows) == {"int2", "lowrank"}
    for r in rows.values():
        assert set(r) >= {"name", "params", "ratio", "rel_error", "encode_ms", "decode_ms", "floor_ms", "x_floor"}
        assert r["ratio"] > 1 and r["x_floor"] > 0
    # measured: int2 0.042, lowrank 0.073 (mean error of the residual stream's reconstruction)
    assert 0 < rows["int2"]["rel_error"] < 0.1 and 0 < rows["lowrank"]["rel_error"] < 0.15
    assert rows["int2"]["ratio"] > 7 and rows["lowrank"]["ratio"] > 20
    assert rows["lowrank"]["params"]["rank"] == 4


def test_bench_drift_json_shows_ef_bounded_and_delta_growing(capsys):
    out = run_json(capsys, "bench", "drift", "--steps", "30", "--compressor", "int2", "--shape", "32,256", "--json")
    modes = out["modes"]
    assert set(modes) == {"none", "delta", "ef", "ef2"} and all(len(v) == 30 for v in modes.values())
    assert modes["delta"][-1] > 2 * modes["ef"][-1]
    assert max(modes["ef"][15:]) < 1.5 * max(modes["ef"][1:15])
    assert min(modes["none"]) > max(modes["ef"][1:])


def test_bad_arguments_exit_with_a_message():
    done = subprocess.run([sys.executable, "-m", "compact_hooks.cli", "bench", "codecs", "--shape", "a,b"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--shape takes comma-separated integers" in done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["launch", "--help"], ["report", "--help"],
                                  ["bench", "scaling", "--help"], ["train-tiny", "--help"]])
def test_subcommands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: compact-hooks" in capsys.readouterr().out
