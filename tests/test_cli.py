"""The `compact-hooks` command: compressors, bench codecs and bench drift print the documented JSON; --help and
--version load nothing heavy; a user error is one line (exit 1), --debug shows its traceback."""

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- a light, quiet command: --help, --version, one-line errors -----------------------------------

HEAVY = ("torch", "diffusers", "transformers", "deepspeed", "torchvision")
# run `compact-hooks ARGV` in this interpreter, then print the heavy packages it imported (last line)
PROBE = """
import json, sys
from compact_hooks.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))))
""" % (HEAVY,)


def cli(*argv: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python -m compact_hooks.cli ARGV`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "compact_hooks.cli", *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["train-tiny", "--help"], ["bench", "--help"],
                                  ["bench", "codecs", "--help"], ["compressors", "--help"], ["--version"],
                                  ["run"]])
def test_help_and_usage_import_nothing_heavy(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]", f"{argv} imported {done.stdout.splitlines()[-1]}"
    if argv != ["run"]:  # `run` without --config is a usage error: its message is on stderr
        assert done.stderr == "", f"{argv} wrote to stderr:\n{done.stderr}"


def test_help_prints_no_warnings():
    done = cli("--help")
    assert done.returncode == 0 and done.stderr == ""
    assert "usage: compact-hooks" in done.stdout and "--version" in done.stdout and "--debug" in done.stdout
    for name in ("compressors", "bench", "run", "launch", "report", "train-tiny"):
        assert f"    {name} " in done.stdout


def test_import_compact_hooks_is_light_and_resolves_names_on_use():
    code = ("import sys, compact_hooks as ch; assert 'torch' not in sys.modules, 'torch on import'; "
            "h = ch.build_hook({'compressor': 'int2'}); from compact_hooks import Stats, stats; "
            "print(type(h).__name__, Stats.__module__, stats.__name__, sorted(set(ch.__all__) - set(dir(ch))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CompactHook", "compact_hooks.stats", "compact_hooks.stats", "[]"]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main([flag])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"compact-hooks {version('compact-hooks')}\n"


def test_config_error_is_one_line_without_traceback():
    done = cli("bench", "drift", "--compressor", "int3", "--steps", "1")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("compact-hooks: error: compressor.name: unknown compressor 'int3'")
    assert "Traceback" not in done.stderr


def test_missing_file_is_one_line_and_debug_shows_the_traceback():
    plain = cli("report", "/nonexistent/stats.json")
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr == "compact-hooks: error: cannot read /nonexistent/stats.json: No such file or directory\n"
    for debug in (cli("--debug", "report", "/nonexistent/stats.json"),
                  cli("report", "/nonexistent/stats.json", env={"COMPACT_HOOKS_DEBUG": "1"})):
        assert debug.returncode == 1
        assert debug.stderr.startswith("Traceback (most recent call last):")
        assert debug.stderr.rstrip().endswith("FileNotFoundError: cannot read /nonexistent/stats.json: "
                                              "No such file or directory")


def test_an_error_on_a_rank_other_than_0_names_the_rank():
    done = cli("report", "/nonexistent/stats.json", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert done.returncode == 1
    assert done.stderr == "compact-hooks: error: [rank 1] cannot read /nonexistent/stats.json: No such file or directory\n"


def test_under_torchrun_each_rank_reports_the_error_once_without_a_traceback():
    from tests.distributed import free_port

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "compact_hooks.cli", "report", "/nonexistent/stats.json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "compact-hooks: error:" in line]
    # the rank that fails second may be stopped by torchrun (SIGTERM) before it reports; the lines do not
    # interleave; what follows them is torchrun's own summary
    assert 1 <= len(lines) <= 2 and len(set(lines)) == len(lines), done.stderr
    for line in lines:
        assert line in ("compact-hooks: error: cannot read /nonexistent/stats.json: No such file or directory",
                        "compact-hooks: error: [rank 1] cannot read /nonexistent/stats.json: No such file or directory")
    assert "compact_hooks/cli.py" not in done.stderr and "bench/report.py" not in done.stderr


def test_usage_errors_keep_argparse_exit_code_2():
    done = cli("run")
    assert done.returncode == 2 and "the following arguments are required: --config" in done.stderr
    assert cli("--no-such-flag").returncode == 2


def test_a_bug_still_raises_with_its_traceback():
    from compact_hooks.cli import dispatch

    def broken(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        dispatch(argparse.Namespace(handler=broken))
    with pytest.raises(KeyError):
        dispatch(argparse.Namespace(handler=lambda args: {}["x"]))


def test_compressors_listing_is_plain_text_with_whole_sentences(capsys):
    from compact_hooks.catalog import describe

    assert main(["compressors"]) == 0
    out = capsys.readouterr().out
    assert "`" not in out and ":class:" not in out and "**" not in out
    flat = " ".join(out.split())
    for row in describe():
        assert row["summary"] in flat, f"{row['name']}: summary cut or missing"
        assert row["summary"].endswith((".", ")")), f"{row['name']}: {row['summary']!r} is cut"
    lowrank = next(r for r in describe() if r["name"] == "lowrank")["summary"]
    assert "so the size only depends on the shape." in lowrank  # the paragraph's last sentence


def test_plain_text_removes_markup_but_not_multiplication():
    from compact_hooks.catalog import plain_text

    assert plain_text("``x`` as :class:`~a.b.Grid`, :func:`f`,\n`y`, **b** *e* and s * P") == \
        "x as Grid, f, y, b e and s * P"
    assert plain_text("Wire layout::") == "Wire layout:"


@settings(max_examples=60, deadline=None)
@given(width=st.integers(min_value=30, max_value=200),
       summaries=st.lists(st.text(alphabet="abcdefgh .,()", min_size=0, max_size=300), min_size=1, max_size=5))
def test_format_rows_keeps_every_word_within_the_width(width, summaries):
    from compact_hooks.catalog import format_rows

    rows = [{"name": f"c{i}", "params": {"k": i}, "summary": s} for i, s in enumerate(summaries)]
    out = format_rows(rows, width)
    indent = len("c0") + 2
    words = [w for r in rows for w in (r["name"], *r["summary"].split(), "[k=%d]" % r["params"]["k"])]
    assert out.split() == words  # nothing lost, nothing cut
    limit = max(width, indent + 20)
    for line in out.splitlines():  # a longer line holds one word that alone does not fit (after the name)
        assert len(line) <= limit or len(line[indent:].split()) == 1, (line, limit)


def test_bench_cli_times_the_command_next_to_python(capsys):
    out = run_json(capsys, "bench", "cli", "--repeats", "1", "--json")
    rows = {r["command"]: r for r in out["rows"]}
    assert out["repeats"] == 1 and list(rows)[0] == "python -c pass" and rows["python -c pass"]["x_python"] == 1.0
    assert {"compact-hooks --help", "compact-hooks --version", "python -c 'import compact_hooks'"} <= set(rows)
    assert all(r["median_s"] > 0 and r["min_s"] <= r["median_s"] for r in rows.values())
