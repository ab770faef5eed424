"""The package as a user gets it (issue 20): the example configs ship inside it and are named without a
path (``--config ulysses-int2``, ``compact-hooks configs``), ``train-tiny`` writes into the working
directory, and a wheel built from the clone installs with its runtime extras into a fresh venv and runs
the demo job from a directory outside the clone.

The fresh venv does not download anything: it is created without pip and sees the project venv's
installed packages through a site directory of links to them (every entry of the project venv's
site-packages except compact-hooks' own files, so the editable install is invisible), and the wheel
goes in with ``pip install --no-index WHEEL[all]``: pip must find every runtime extra's requirement
already installed, and compact-hooks itself comes only from the wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from compact_hooks.cli import build_parser
from compact_hooks.cli import main as cli_main
from compact_hooks.config import load_config
from compact_hooks.configs import DESCRIPTIONS, OLD_NAMES, packaged_configs
from compact_hooks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "compact_hooks" / "configs"
WEIGHTS = ROOT / "integrations" / "diffusers" / "weights" / "flux-digits"
# what the wheel build copies of the clone: everything but venvs, git, outputs and caches
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "out", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".ruff_cache")


# ---- packaged configs ---------------------------------------------------------------------------


def test_every_packaged_config_is_described_named_and_loads() -> None:
    files = sorted(p.name for p in PACKAGED.glob("*.json"))
    assert files and sorted(DESCRIPTIONS) == files, "every compact_hooks/configs/*.json needs a DESCRIPTIONS row"
    rows = packaged_configs()
    assert len({r.name for r in rows}) == len(rows), f"two packaged configs share a short name: {rows}"
    for r in rows:
        assert "/" not in r.name and "_" not in r.name and not r.name.endswith(".json")
        by_name = load_config(r.name)
        assert by_name == load_config(r.path) == load_config(r.path.name) == load_config(r.path.stem)
        assert by_name.enabled
    assert load_config("ulysses-int2") == load_config(PACKAGED / "diffusers_ulysses_int2.json")


def test_examples_configs_are_links_to_the_packaged_files() -> None:
    # the old paths keep working (docs, DeepSpeed's own --deepspeed_config) with one copy of the content
    examples = ROOT / "examples" / "configs"
    expected = {**OLD_NAMES, "diffusers_ulysses_int2.json": "diffusers_ulysses_int2.json"}
    assert sorted(p.name for p in examples.iterdir()) == sorted(expected)
    for old, new in expected.items():
        link = examples / old
        assert link.is_symlink() and link.resolve() == (PACKAGED / new).resolve(), old
        assert load_config(link) == load_config(old) == load_config(PACKAGED / new)


def test_a_file_at_the_given_path_wins_over_a_packaged_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ulysses-int2").write_text(json.dumps({"compact_hooks": {"compressor": "int8"}}))
    monkeypatch.chdir(tmp_path)
    assert load_config("ulysses-int2").compressor == "int8"
    assert load_config("deepspeed-tp-int8").compressor == "int8"  # no such file here: the packaged one


def test_a_missing_config_names_the_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the config file.*named 'ulysses-int2' \(--config ulysses-int2"):
        load_config(tmp_path / "examples" / "configs" / "diffusers_ulysses_int2.json")
    with pytest.raises(ConfigError, match=r"ulysses-int3: cannot read .*packaged configs .*ulysses-int2.*compact-hooks configs"):
        load_config("ulysses-int3")
    with pytest.raises(ConfigError, match="cannot read the config file"):  # a directory: no hint
        load_config(tmp_path)


def test_configs_subcommand_lists_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["configs"]) == 0
    listing = capsys.readouterr().out
    for r in packaged_configs():
        assert re.search(rf"^{re.escape(r.name)}\s+.*{re.escape(r.description)}$", listing, re.M), listing
    assert cli_main(["configs", "ulysses-int2"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((PACKAGED / "diffusers_ulysses_int2.json").read_text())
    assert cli_main(["configs", "tp_int8.json", "--path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == PACKAGED / "deepspeed_tp_int8.json"
    with pytest.raises(SystemExit) as exc:
        cli_main(["configs", "ulysses-int3"])
    assert exc.value.code == 2 and "no packaged config named 'ulysses-int3'" in capsys.readouterr().err


def test_train_tiny_writes_to_the_working_directory_by_default() -> None:
    args = build_parser("train-tiny").parse_args(["train-tiny"])
    out = Path(args.out)
    assert not out.is_absolute(), f"train-tiny's default --out {out} must be relative to the working directory"
    package = (ROOT / "integrations").resolve()
    assert package not in (Path.cwd() / out).resolve().parents


# ---- the wheel, installed outside the clone -------------------------------------------------------


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_clone(tmp_path: Path) -> None:
    # 1. the wheel, built offline from a copy of the clone (the build leaves build/ and egg-info behind)
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    build_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], tmp_path, build_env)
    (wheel,) = dist.glob("compact_hooks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ["compact_hooks/bench/gpu_check.sh", "compact_hooks/configs/__init__.py",
                 *(f"compact_hooks/configs/{f}" for f in DESCRIPTIONS),
                 *(f"compact_hooks/integrations/diffusers/weights/flux-digits/{f}" for f in _digest(WEIGHTS))]:
        assert name in names, f"the wheel lacks {name}"
    # [all] is the runtime extras only; the test tools are in [test], and [dev] is both
    metadata = zipfile.ZipFile(wheel).read("compact_hooks-" + wheel.name.split("-")[1] + ".dist-info/METADATA").decode()
    extras: dict[str, set[str]] = {}
    for req, extra in re.findall(r'^Requires-Dist: ([A-Za-z0-9_.\-]+).*extra == "(\w+)"$', metadata, re.M):
        extras.setdefault(extra, set()).add(req.lower())
    tools = {"pytest", "pytest-timeout", "hypothesis", "ruff", "triton"}
    assert extras["test"] == tools and not extras["all"] & tools, extras
    assert extras["all"] == set().union(*(extras[e] for e in ("deepspeed", "diffusers", "mpi", "xdit", "quality")))
    assert extras["dev"] == extras["all"] | tools

    # 2. a fresh venv that sees the project venv's packages (torch, diffusers, ...) but not compact-hooks
    venv, shared = tmp_path / "venv", tmp_path / "shared"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, build_env)
    shared.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("compact_hooks", "compact-hooks", "__editable__")):
            (shared / entry.name).symlink_to(entry)
    bindir = venv / "bin"
    py = str(bindir / "python")
    site_packages = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              tmp_path, build_env).strip())
    (site_packages / "_project_packages.pth").write_text(f"import site; site.addsitedir({str(shared)!r})\n")
    env = {**build_env, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
           "OMP_NUM_THREADS": "1"}
    outside = tmp_path / "user"
    outside.mkdir()
    _run([py, "-m", "pip", "install", "--no-index", "--no-cache-dir", "-q", f"{wheel}[all]"], outside, env)
    where = _run([py, "-c", "import compact_hooks, torch; print(compact_hooks.__file__)"], outside, env)
    assert Path(where.strip()).is_relative_to(site_packages), f"compact_hooks imported from {where}, not the wheel"

    # 3. what a new user runs, from a directory outside the clone
    assert re.search(r"compact-hooks \d+\.\d+", _run(["compact-hooks", "--version"], outside, env))
    listing = _run(["compact-hooks", "configs"], outside, env)
    assert all(r.name in listing for r in packaged_configs())
    out = outside / "demo"
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
          "compact-hooks", "run", "--config", "ulysses-int2", "--steps", "2", "--out", str(out)], outside, env)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["steps"] == 2
    assert stats["compression_ratio"] > 1, stats["compression_ratio"]
    assert (out / "grid.png").is_file()

    # 4. train-tiny writes out/flux-digits in the working directory, not into the installed package
    installed_weights = site_packages / "compact_hooks" / "integrations" / "diffusers" / "weights" / "flux-digits"
    assert _digest(installed_weights) == _digest(WEIGHTS)
    _run(["compact-hooks", "train-tiny", "--steps", "1", "--batch", "2", "--no-check"], outside, env)
    assert (outside / "out" / "flux-digits" / "config.json").is_file()
    assert _digest(installed_weights) == _digest(WEIGHTS), "train-tiny wrote into the installed package"
