"""Every command of README.md and docs/*.md runs as written (issue 20, "docs that run as written").

tests/docs_extract.py extracts each shell command of the docs' fenced blocks and each ```python block.
Every command needs exactly one entry in :data:`COMMANDS`:

- :class:`Run`: run here on CPU by bash, as written or with the substitutions the entry lists (fewer
  steps, ``--dry-run`` instead of real hosts, a free port), and its output must match ``expect``;
- :class:`Covered`: ``"tests/test_x.py::test_name"``, an existing test that runs the same command;
- :class:`Elsewhere`: ``GPU_ONLY``, ``ROOT_ONLY`` (network namespaces, minutes) or ``EXTERNAL`` (a
  cluster, real hosts, a registry, a user's own script);
- :class:`Usage`: a usage synopsis, whose options must be exactly the real parser's.

Every command, whatever its entry, is also checked statically: each ``compact-hooks`` argv in it (also
after ``--no-python``, ``--`` or ``-m compact_hooks...job``) parses with the real CLI parser, packaged
config names and shipped files exist, a shipped script knows the flags given to it, pip extras and
make targets exist, and no ``...`` placeholder is left. Python blocks compile and their imports resolve.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

from tests.docs_extract import (
    ROOT,
    Command,
    doc_commands,
    named_test_problem,
    python_block,
    python_blocks,
    script_flags,
    simple_commands,
)

GPU_ONLY, ROOT_ONLY, EXTERNAL = "GPU_ONLY", "ROOT_ONLY", "EXTERNAL"
# frameworks an import in a doc may need; absent ones are skipped (make test installs them all)
OPTIONAL = {"diffusers", "deepspeed", "yunchang", "mpi4py", "transformers", "triton", "flash_attn"}
MODULE_COMMANDS = {"compact_hooks.integrations.diffusers.job": ["run"],
                   "compact_hooks.integrations.diffusers.train_tiny": ["train-tiny"], "compact_hooks.cli": []}
REPO_DIRS = ("examples/", "compact_hooks/", "integrations/", "launcher/", "tests/", "docs/")
TIMEOUT_S = 420
# a Run command naming the word needs the module (an extra); without it the run is skipped
REQUIRES = {"deepspeed": "deepspeed", "mpirun": "mpi4py", "diffusers": "diffusers", "compact-hooks run": "diffusers",
            "usp_link_aware": "diffusers", "bench scaling": "diffusers"}


@dataclass(frozen=True)
class Run:
    """Run here: ``subs`` are (text, replacement) pairs applied first ({port}: a free port, {repo}: the
    clone); ``cwd`` "work" is a scratch folder shared by the commands of this file, "repo" the clone;
    ``needs`` are commands (keys) to run first; ``expect`` a regex the output must contain."""

    expect: str
    subs: tuple[tuple[str, str], ...] = ()
    cwd: str = "work"
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Covered:
    test: str


@dataclass(frozen=True)
class Elsewhere:
    kind: str
    why: str


@dataclass(frozen=True)
class Usage:
    pass


Entry = Union[Run, Covered, Elsewhere, Usage]
DRY = ((" -- ", " --dry-run -- "),)  # real hosts: print the launch plan instead of starting it
NODE0 = ((" -- ", " --node-rank 0 --dry-run -- "),)  # torchrun: this machine is not in the hostfile
HOSTS = "cat > hosts <<'EOF'"
TRACE_RUN = ("torchrun --standalone --nproc-per-node 2 --no-python compact-hooks run --config ulysses-int2 "
             "--no-reference --out out/trace_run --record-trace out/trace "
             "--trace-keys \"transformer_blocks.*,single_transformer_blocks.1.*\"")
FLUX = "--model /path/to/FLUX.1-dev"
WHEEL = "tests/test_wheel.py::test_wheel_installs_and_runs_the_demo_outside_the_clone"
E2E = "network namespaces with tc rate caps need root, and the run takes minutes; " \
      "tests/test_bench_e2e.py runs a tiny one"

COMMANDS: dict[str, Entry] = {
    # README.md
    "cd compact-hooks": Elsewhere(EXTERNAL, "a clone of the repository"),
    "pip install torch": Elsewhere(EXTERNAL, "installs from the package registry"),
    "pip install -e '.[all]'": Elsewhere(EXTERNAL, "installs from the package registry (the extras exist)"),
    "pip wheel --no-deps -w dist .": Covered(WHEEL),
    "pip install 'dist/compact_hooks-0.1.0-py3-none-any.whl[all]'": Covered(WHEEL),
    "make demo": Covered("tests/test_diffusers_job.py::test_run_job_two_ranks_writes_png_and_stats"),
    "make test": Elsewhere(EXTERNAL, "the whole suite, this file included"),
    "torchrun --standalone --nproc-per-node 4 --no-python compact-hooks run --model /path/to/FLUX.1-dev "
    "--config ulysses-int2 --prompt \"a lighthouse on a cliff at sunset\" --steps 28 --height 1024 --width 1024 "
    "--out out/flux": Elsewhere(GPU_ONLY, "FLUX.1-dev on 4 GPUs"),
    "deepspeed --num_gpus 4 --no_python --no_local_rank compact-hooks run --config ulysses-int2 "
    "--model /path/to/FLUX.1-dev --steps 28 --height 1024 --width 1024 --out out/flux":
        Elsewhere(GPU_ONLY, "FLUX.1-dev on 4 GPUs"),
    "compact-hooks launch --launcher mpirun --hostfile hosts --ifname eth1 -- compact-hooks run --config "
    "ulysses-int2 --model /path/to/FLUX.1-dev --steps 28 --height 1024 --width 1024 --out out/flux":
        Run(r"--host node0:2,node1:2 .*GLOO_SOCKET_IFNAME=eth1 .*compact-hooks run --config ulysses-int2",
            DRY, needs=(HOSTS,)),
    # docs/benchmarks.md
    "for dt in float16 bfloat16 float32; do .venv/bin/compact-hooks bench codecs --shape 1088,3072 --dtype $dt "
    "--threads 1 --repeats 7; done":
        Run(r"(?s)float16 on cpu.*bfloat16 on cpu.*float32 on cpu.*lowrank",
            (("--shape 1088,3072", "--shape 64,256"), ("--repeats 7", "--repeats 1")), cwd="repo"),
    "bash compact_hooks/bench/gpu_check.sh": Elsewhere(GPU_ONLY, "times the codecs and kernels on a GPU"),
    "pip install --no-deps xfuser==0.7.0 sentencepiece beautifulsoup4 soupsieve distvae av peft":
        Elsewhere(EXTERNAL, "installs from the package registry; tests/test_funcol.py runs xfuser when installed"),
    "bash compact_hooks/bench/xfuser_check.sh": Elsewhere(GPU_ONLY, "xfuser's USP on 2 or more GPUs (NCCL)"),
    ".venv/bin/compact-hooks bench drift --steps 50 --compressor int2": Run(r"\n\s+49\s+0\.5", cwd="repo"),
    ".venv/bin/compact-hooks bench scaling --world 2 3 4 --side 16 32 --blocks 3 6":
        Run(r"\n\s+2\s+268\s+3\s+617472\s+617472\s+41904\s+14\.74",
            (("--world 2 3 4", "--world 2"), ("--side 16 32", "--side 16"), ("--blocks 3 6", "--blocks 3")),
            cwd="repo"),
    ".venv/bin/compact-hooks bench scaling --preset wan2.1-14b-720p-81f --world 2 4 8 16":
        Run(r"\n\s*8 ulysses\s+27\.10\s+14\.39\s+14\.39\s+0\.68/27\.10",
            (("--world 2 4 8 16", "--world 8 --check-world 0"),), cwd="repo"),  # the check: tests/test_bases.py
    ".venv/bin/compact-hooks bench e2e --hosts 2 --rate 1gbit --rate 100mbit --rate 20mbit --model medium "
    "--out e2e.json --plot e2e_ladder.png": Elsewhere(ROOT_ONLY, E2E),
    ".venv/bin/compact-hooks bench e2e --hosts 2 --rate 5mbit --model small --steps 20 --lowrank-rank 8 "
    "--auto-target 0.06 --overhead-repeats 0 --out e2e_small20_5mbit.json": Elsewhere(ROOT_ONLY, E2E),
    ".venv/bin/compact-hooks bench e2e --hosts 2 --rate 20mbit --model small --steps 20 --out e2e_small20.json":
        Elsewhere(ROOT_ONLY, E2E),
    ".venv/bin/compact-hooks bench e2e --mode usp --hosts 2 --ranks-per-host 2 --rate 100mbit --rate 10mbit "
    "--model small --steps 6 --out e2e_usp.json": Elsewhere(ROOT_ONLY, E2E.replace("e2e.py", "e2e_usp.py")),
    ".venv/bin/compact-hooks bench e2e --mode ring --hosts 3 --model small --steps 20 --rate 1gbit --rate 100mbit "
    "--rate 20mbit --json": Elsewhere(ROOT_ONLY, E2E.replace("e2e.py", "e2e_ring.py")),
    # docs/deepspeed.md
    "DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 examples/deepspeed_ulysses.py "
    "--deepspeed_config examples/configs/ulysses_int2.json":
        Run(r"max error vs uncompressed", (("--num_gpus 2", "--num_gpus 2 --master_port {port}"),), cwd="repo"),
    "DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 examples/deepspeed_tp.py "
    "--deepspeed_config examples/configs/tp_int8.json":
        Covered("tests/test_deepspeed_tp.py::test_flux_lossy_bounded"),
    "DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 4 examples/deepspeed_tp.py --model llama "
    "--deepspeed_config examples/configs/tp_int8.json": Covered("tests/test_deepspeed_tp.py::test_tp_groups"),
    "deepspeed --num_gpus 8 examples/deepspeed_tp.py --deepspeed_config my_config.json":
        Elsewhere(GPU_ONLY, "8 GPUs and the user's config"),
    # docs/diffusers.md
    "pip install -e '.[diffusers]'": Elsewhere(EXTERNAL, "installs from the package registry (the extra exists)"),
    "compact-hooks run --config CONFIG.json [--model trained|random|PATH] [--prompt-embeds FILE] [--prompt TEXT] "
    "[--steps N] [--height H --width W] [--guidance-scale G] [--out DIR] [--seed S] "
    "[--mode ulysses|allgather|ring|usp|native] [--ulysses-degree U --ring-degree R] [--dtype bf16|fp16|fp32] "
    "[--no-reference] [--record-trace DIR [--trace-keys GLOBS] [--trace-steps N]] [--single-process]": Usage(),
    "torchrun --standalone --nproc-per-node 2 -m compact_hooks.integrations.diffusers.job --config ulysses-int2":
        Covered("tests/test_diffusers_job.py::test_run_job_two_ranks_writes_png_and_stats"),
    "DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module compact_hooks.integrations.diffusers.job "
    "--config ulysses-int2":
        Run(r"wrote out/ds/stats.json", (("--num_gpus 2", "--num_gpus 2 --master_port {port}"),
                                         ("--config ulysses-int2", "--config ulysses-int2 --steps 2 --out out/ds"))),
    "mpirun -n 2 python -m compact_hooks.integrations.diffusers.job --config ulysses-int2":
        Run(r"wrote out/mpi/stats.json", (("--config ulysses-int2", "--config ulysses-int2 --steps 2 --out out/mpi"),)),
    "torchrun --standalone --nproc-per-node 4 -m compact_hooks.integrations.diffusers.job "
    "--model /path/to/FLUX.1-dev --config ulysses-int2 --prompt \"a lighthouse on a cliff at sunset\" "
    "--steps 28 --height 1024 --width 1024 --out out/flux": Elsewhere(GPU_ONLY, "FLUX.1-dev on 4 GPUs"),
    "torchrun --standalone --nproc-per-node 4 --no-python compact-hooks run --mode native --ulysses-degree 2 "
    "--ring-degree 2 --model /path/to/Wan2.1-T2V-1.3B-Diffusers --config ulysses-int2 "
    "--prompt \"a red fox running through fresh snow\" --steps 30 --height 480 --width 832 --out out/wan":
        Elsewhere(GPU_ONLY, "Wan 2.1 on 4 GPUs (tests/test_native_cp.py runs --mode native on CPU)"),
    "compact-hooks report out/flux/stats.json --out out/flux/report.png":
        Run(r"report\.png", (("out/flux", "out/trace_run"),), needs=(TRACE_RUN,)),
    # docs/failure-behaviour.md
    "pytest -m reliability": Elsewhere(EXTERNAL, "a part of the suite (the marker exists and is used)"),
    # docs/multinode.md
    HOSTS: Run(r"^$"),
    "compact-hooks launch --launcher mpirun --hostfile hosts --ifname eth1 -- python infer.py":
        Run(r"-np 4 --bind-to none --host node0:2,node1:2 --mca btl_tcp_if_include eth1", DRY, needs=(HOSTS,)),
    "compact-hooks launch --launcher deepspeed --hostfile hosts --master-addr 10.0.0.1 -- python infer.py":
        Run(r"deepspeed --hostfile hosts --master_addr 10.0.0.1 infer.py", DRY, needs=(HOSTS,)),
    "compact-hooks launch --launcher torchrun --hostfile hosts --master-addr 10.0.0.1 -- python infer.py":
        Run(r"--nnodes 2 --nproc-per-node 2 --node-rank 0 --master-addr 10.0.0.1", NODE0, needs=(HOSTS,)),
    "compact-hooks launch --launcher mpirun --nproc-per-node 4 --dry-run -- compact-hooks run --config ulysses-int2":
        Run(r"mpirun -np 4 .*compact-hooks run --config ulysses-int2"),
    "compact-hooks launch --launcher {deepspeed,mpirun,torchrun} [--hostfile FILE] [--nproc-per-node N] "
    "[--nnodes N] [--node-rank K] [--master-addr A] [--master-port P] [--ifname IF] [--launcher-args \"...\"] "
    "[--dry-run] -- COMMAND [ARGS...]": Usage(),
    ".venv/bin/mpirun -np 4 --hostfile hosts --bind-to none -x GLOO_SOCKET_IFNAME=eth1 .venv/bin/python infer.py":
        Elsewhere(EXTERNAL, "real hosts and the user's infer.py"),
    "compact-hooks launch --launcher deepspeed --hostfile hosts --master-addr 10.0.0.1 --ifname eth1 -- "
    "python infer.py": Run(r"DS_ENV_FILE.*GLOO_SOCKET_IFNAME=eth1", DRY, needs=(HOSTS,)),
    "compact-hooks launch --launcher torchrun --hostfile hosts --master-addr 10.0.0.1 --ifname eth1 -- "
    "python infer.py": Run(r"--node-rank 0 --master-addr 10.0.0.1", NODE0, needs=(HOSTS,)),
    "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)":
        Elsewhere(EXTERNAL, "a Slurm job script"),
    "export GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1": Elsewhere(EXTERNAL, "a Slurm job script"),
    "srun python infer.py": Elsewhere(EXTERNAL, "a Slurm job and the user's infer.py"),
    "ip -4 -brief addr": Elsewhere(EXTERNAL, "this host's own interfaces (iproute2)"),
    "ping -I eth1 10.0.0.2": Elsewhere(EXTERNAL, "another host on eth1"),
    "OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 4 "
    "examples/usp_link_aware.py --fake-hosts 2":
        Run(r"inter_host: 32 calls, 1\.11 MB raw, 0\.14 MB on the wire \(ratio 7\.97\)", cwd="repo"),
    # docs/quality.md
    "compact-hooks train-tiny": Covered(WHEEL),
    "compact-hooks train-tiny --out out/my-digits --steps 1600 --seed 0 --threads 1":
        Covered("tests/test_trained_model.py::test_training_is_deterministic_and_saves_a_loadable_model"),
    "compact-hooks bench quality --json": Covered("tests/test_bench_quality.py::test_rows_have_the_documented_fields"),
    "torchrun --standalone --nproc-per-node 4 -m compact_hooks.integrations.diffusers.job "
    "--model /path/to/FLUX.1-dev --config ulysses-int2 --record-trace trace/ "
    "--trace-keys \"transformer_blocks.0.*,single_transformer_blocks.20.attn:*\" --no-reference":
        Elsewhere(GPU_ONLY, "FLUX.1-dev on 4 GPUs"),
    "compact-hooks bench trace trace/ --json":
        Covered("tests/test_trace.py::test_replay_cli_json_reports_every_codec_and_mode"),
    "compact-hooks bench trace trace/ --codec int2 --codec '{\"name\": \"lowrank\", \"rank\": 16}' --modes ef,delta":
        Run(r"lowrank.*\bdelta\b", (("trace/", "out/trace"),), needs=(TRACE_RUN,)),
    TRACE_RUN: Run(r"wrote out/trace_run/stats.json"),
    "compact-hooks bench trace out/trace --codec int1 --codec int2 --codec int2cf --codec int4 --codec int8 "
    "--codec lowrank --codec '{\"name\": \"lowrank\", \"rank\": 4, \"factor_bits\": 8}' --codec topk --codec bf16":
        Run(r"(?s)int2\s+ef\s+12\.53x.*lowrank\(factor_bits=8,rank=4\)\s+ef\s+34\.09x", needs=(TRACE_RUN,)),
}

ALL = doc_commands()
UNIQUE = list({c.key: c for c in reversed(ALL)}.values())[::-1]  # first occurrence of each command
RUNS = [c for c in UNIQUE if isinstance(COMMANDS.get(c.key), Run)]


def _id(c: Command) -> str:
    return c.where


# ---- the table ----------------------------------------------------------------------------------


def test_every_documented_command_has_an_entry() -> None:
    missing = [f"{c.where}: {c.key}" for c in ALL if c.key not in COMMANDS]
    assert not missing, ("commands of the docs without an entry in COMMANDS of tests/test_docs_commands.py "
                         "(add one: Run, Covered, Elsewhere or Usage, keyed by the command as printed):\n"
                         + "\n".join(missing))


def test_every_entry_is_a_documented_command() -> None:
    keys = {c.key for c in ALL}
    stale = [k for k in COMMANDS if k not in keys]
    assert not stale, f"entries of COMMANDS that no doc has any more (remove or update them): {stale}"


def test_entries_are_well_formed() -> None:
    for key, entry in COMMANDS.items():
        if isinstance(entry, Covered):
            problem = named_test_problem(entry.test)
            assert problem is None, f"{key}: {problem}"
        elif isinstance(entry, Elsewhere):
            assert entry.kind in (GPU_ONLY, ROOT_ONLY, EXTERNAL) and entry.why, (key, entry)
        elif isinstance(entry, Run):
            assert entry.cwd in ("work", "repo") and all(isinstance(COMMANDS.get(n), Run) for n in entry.needs)
            for old, _ in entry.subs:
                assert old in key, f"{key}: the substitution {old!r} no longer matches the command"


# ---- static checks of every command ---------------------------------------------------------------


def _cli_argvs(argv: list[str]) -> list[list[str]]:
    """The ``compact-hooks`` argvs inside one simple command."""
    found = []
    for i, token in enumerate(argv):
        if token.rsplit("/", 1)[-1] == "compact-hooks" and argv[0] != "cd":  # `cd compact-hooks`: the clone
            found.append(argv[i + 1:])
        elif token in ("-m", "--module") and i + 1 < len(argv) and argv[i + 1] in MODULE_COMMANDS:
            found.append([*MODULE_COMMANDS[argv[i + 1]], *argv[i + 2:]])
    return found


def _parse_problem(argv: list[str]) -> Optional[str]:
    from compact_hooks.cli import build_parser

    command = next((a for a in argv if not a.startswith("-")), None)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(command).parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return f"`compact-hooks {' '.join(argv)}` does not parse: {err.getvalue().strip()}"
    return None


def _config_problem(argv: list[str]) -> Optional[str]:
    from compact_hooks.configs import packaged_configs

    names = {r.name for r in packaged_configs()}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and "/" not in value and not value.endswith(".json") and value not in names:
            return f"--config {value}: no packaged config of that name ({sorted(names)})"
    return None


def _problems(command: Command) -> list[str]:
    problems = []
    for argv in simple_commands(command.key):
        problems += [f"`{t}`: a placeholder; write a concrete value" for t in argv if "..." in t]
        for cli in _cli_argvs(argv):
            problems += [p for p in (_parse_problem(cli), _config_problem(cli)) if p]
        for i, token in enumerate(argv):
            path = token.rstrip(",;")
            if path.startswith(REPO_DIRS) and not (ROOT / path).exists():
                problems.append(f"{path}: no such file in the repository")
            if path.startswith(".venv/bin/") and not (Path(sys.executable).parent / path[10:]).exists():
                problems.append(f"{path}: the venv has no {path[10:]} (which extra installs it?)")
            if path.endswith(".py") and (ROOT / path).is_file() and (flags := script_flags(ROOT / path)):
                given = {a.split("=")[0] for a in argv[i + 1:] if a.startswith("-")}
                problems += [f"{path} has no option {f}" for f in sorted(given - flags)]
        problems += _tool_problems(argv)
    return problems


def _tool_problems(argv: list[str]) -> list[str]:
    """pip extras and the wheel's version, make targets, pytest markers."""
    problems = []
    if argv[0] == "pip" and "install" in argv:
        dist = metadata.metadata("compact-hooks")
        extras = set(dist.get_all("Provides-Extra") or [])
        for token in argv:
            for extra in (m.group(1).split(",") if (m := re.search(r"\[([\w,-]+)\]$", token)) else []):
                if extra not in extras:
                    problems.append(f"{token}: compact-hooks has no extra {extra!r} ({sorted(extras)})")
            if (m := re.search(r"compact_hooks-([^-]+)-", token)) and m.group(1) != dist["Version"]:
                problems.append(f"{token}: the wheel of this version is compact_hooks-{dist['Version']}-...")
    if argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        problems += [f"make {t}: no such target" for t in argv[1:] if not re.search(rf"^{t}:", makefile, re.M)]
    if argv[0] == "pytest" and "-m" in argv:
        marker = argv[argv.index("-m") + 1]
        if f'"{marker}:' not in (ROOT / "pyproject.toml").read_text():
            problems.append(f"pytest -m {marker}: the marker is not declared in pyproject.toml")
        if not any(f"mark.{marker}" in p.read_text() for p in (ROOT / "tests").glob("test_*.py")):
            problems.append(f"pytest -m {marker}: no test carries the marker")
    return problems


@pytest.mark.parametrize("command", [c for c in ALL if not isinstance(COMMANDS.get(c.key), Usage)], ids=_id)
def test_command_parses_and_names_what_exists(command: Command) -> None:
    problems = _problems(command)
    assert not problems, f"{command.where}: {command.key}\n" + "\n".join(problems)


def _options(argv: list[str]) -> set[str]:
    from compact_hooks.cli import build_parser

    parser = build_parser(argv[0])
    sub = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]  # noqa: SLF001
    return {o for a in sub._actions if a.help != "==SUPPRESS==" for o in a.option_strings  # noqa: SLF001
            if o.startswith("--") and o != "--help"}


@pytest.mark.parametrize("command", [c for c in UNIQUE if isinstance(COMMANDS.get(c.key), Usage)], ids=_id)
def test_usage_synopsis_lists_exactly_the_parsers_options(command: Command) -> None:
    words = command.key.split()[1:]
    shown = set(re.findall(r"(--[a-z][\w-]*)", command.key))
    declared = _options(words)
    assert shown == declared, (f"{command.where}: the synopsis of `compact-hooks {words[0]}` differs from its "
                               f"parser: not in the parser {sorted(shown - declared)}, "
                               f"missing from the synopsis {sorted(declared - shown)}")


# ---- Python blocks -------------------------------------------------------------------------------


def _import_problems(tree: ast.AST) -> list[str]:
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            top = module.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                problems.append(f"import {module}: {exc}")
                continue
            if name and not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                problems.append(f"from {module} import {name}: {module} has no {name}")
    return problems


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.where)
def test_python_block_compiles_and_its_imports_resolve(block) -> None:
    tree = ast.parse(compile(block.text, block.where, "exec", flags=ast.PyCF_ONLY_AST))
    problems = _import_problems(tree)
    problems += [f"{n.value}: no such file in the repository" for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(REPO_DIRS)
                 and not (ROOT / n.value).exists()]
    assert not problems, f"{block.where} ({block.heading}):\n" + "\n".join(problems)


# ---- running the commands ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    if os.geteuid() == 0:  # Open MPI refuses root without these (docs/diffusers.md says so)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


@pytest.fixture(scope="module")
def run_doc(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``run_doc(key)``: run a Run command once (after what it needs) and return its output."""
    from tests.distributed import free_port

    work = tmp_path_factory.mktemp("docs")
    done: dict[str, str] = {}
    scripts = {c.key: c.script for c in ALL}

    def run(key: str) -> str:
        if key not in done:
            entry = COMMANDS[key]
            assert isinstance(entry, Run)
            for need in entry.needs:
                run(need)
            script = scripts[key]
            for word, module in REQUIRES.items():
                if word in script and importlib.util.find_spec(module) is None:
                    pytest.skip(f"`{key}` needs {module} (an extra of compact-hooks; make test installs them all)")
            for old, new in entry.subs:
                script = script.replace(old, new.format(port=free_port(), repo=ROOT))
            proc = subprocess.run(["bash", "-c", script], cwd=work if entry.cwd == "work" else ROOT, env=_env(),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"`{script}` failed ({proc.returncode}):\n{output[-4000:]}"
            assert re.search(entry.expect, output, re.M), f"`{script}`: no {entry.expect!r} in\n{output[-4000:]}"
            done[key] = output
        return done[key]

    run.work = work  # type: ignore[attr-defined]
    return run


@pytest.mark.parametrize("command", RUNS, ids=_id)
def test_documented_command_runs(command: Command, run_doc: Callable[[str], str]) -> None:
    run_doc(command.key)


def test_readme_quick_start_runs_on_two_ranks(run_doc: Callable[[str], str]) -> None:
    """README's quick start, saved as quickstart.py and run as it says: ``torchrun --nproc-per-node 2
    quickstart.py`` (with a free --master-port)."""
    from tests.distributed import free_port

    readme = (ROOT / "README.md").read_text()
    assert "torchrun --nproc-per-node 2 quickstart.py" in readme
    work: Path = run_doc.work  # type: ignore[attr-defined]
    (work / "quickstart.py").write_text(python_block("README.md", "Quick start").text)
    proc = subprocess.run(["torchrun", "--master-port", str(free_port()), "--nproc-per-node", "2", "quickstart.py"],
                          cwd=work, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = re.findall(r"^([0-9.]+) (\d+)$", proc.stdout, re.M)
    assert len(printed) == 2, f"each rank prints the ratio and the wire bytes:\n{proc.stdout[-3000:]}"
    for ratio, wire in printed:
        assert float(ratio) > 4 and int(wire) > 0, printed  # int2 residuals after one full step


def test_custom_compressor_example_registers_and_round_trips() -> None:
    """docs/compressors.md's ScaledFp16, pasted into a script: usable by name, decodes what it encodes."""
    code = python_block("docs/compressors.md", "Writing and registering a compressor").text + (
        "\nfrom compact_hooks import build_compressor\n"
        "c = build_compressor({'name': 'scaled_fp16', 'scale': 4.0})\n"
        "x = torch.randn(8, 32)\n"
        "y = c.decode(c.encode(x), tuple(x.shape), x.dtype)\n"
        "assert torch.allclose(x, y, atol=1e-2), (x - y).abs().max()\n"
        "print('ok', c.encode(x).numel())\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-3000:]
