"""``compact-hooks bench cli``: how long the command takes to start, next to a bare ``python -c pass``.

::

    compact-hooks bench cli --repeats 5

Each command runs ``--repeats`` times as a fresh process, the commands taking turns so that a busy
machine slows them alike; the table has the median and the fastest wall time of each and the
median's ratio to ``python -c pass`` (the interpreter's own start-up, the floor). ``compact-hooks``
is the console script next to the running python (``python -m compact_hooks.cli`` without one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASELINE = "python -c pass"


def cli_command() -> list[str]:
    """How to start ``compact-hooks`` with the running interpreter."""
    script = Path(sys.executable).with_name("compact-hooks")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "compact_hooks.cli"]


def commands() -> dict[str, list[str]]:
    """Label -> argv of each command timed (the baseline first)."""
    cli = cli_command()
    return {
        BASELINE: [sys.executable, "-c", "pass"],
        "compact-hooks --help": [*cli, "--help"],
        "compact-hooks --version": [*cli, "--version"],
        "compact-hooks run --help": [*cli, "run", "--help"],
        "python -c 'import compact_hooks'": [sys.executable, "-c", "import compact_hooks"],
        "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    }


def wall_time(argv: list[str]) -> float:
    """Seconds from start to exit of ``argv`` (output discarded); a failing command raises."""
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=600)
    return time.perf_counter() - start


def bench_cli(repeats: int = 5) -> dict[str, Any]:
    """Median and fastest wall time of each command over ``repeats`` turns, and the ratio to the baseline."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    argvs = commands()
    times: dict[str, list[float]] = {label: [] for label in argvs}
    for _ in range(repeats):
        for label, argv in argvs.items():
            times[label].append(wall_time(argv))
    floor = statistics.median(times[BASELINE])
    rows = [{"command": label, "median_s": statistics.median(t), "min_s": min(t),
             "x_python": statistics.median(t) / floor} for label, t in times.items()]
    return {"repeats": repeats, "python": sys.executable, "rows": rows}


def format_result(result: dict[str, Any]) -> str:
    width = max(len(r["command"]) for r in result["rows"])
    lines = [f"start-up wall time over {result['repeats']} runs (x: median / median of `{BASELINE}`)",
             f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'x':>6}"]
    lines += [f"{r['command']:<{width}}  {r['median_s']:>9.3f}  {r['min_s']:>7.3f}  {r['x_python']:>5.1f}x"
              for r in result["rows"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = bench_cli(args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench cli`` on ``compact-hooks bench``'s subparsers."""
    p = kinds.add_parser("cli", help="start-up time of compact-hooks --help and --version vs python -c pass",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=main)
