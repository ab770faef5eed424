"""Rank discovery (every launcher's variables), hostfile parsing and ``launch --dry-run`` command lines."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from compact_hooks.launcher import launch
from compact_hooks.launcher.launch import Context, Host, LaunchError, build_plan, parse_args, parse_hostfile
from compact_hooks.launcher.mpi import RankDiscoveryError, RankInfo, apply, discover, free_port, interface_ipv4

OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
PMI = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "x"}
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234"}


class FakeMPI:
    """``broadcast`` for discover(): rank 0's value, recorded."""

    def __init__(self, rank0_value: Any = None) -> None:
        self.rank0_value = rank0_value
        self.calls: list[Any] = []

    def __call__(self, value: Any) -> Any:
        self.calls.append(value)
        return value if self.rank0_value is None else self.rank0_value


# -- discovery --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, launcher", [(OMPI, "openmpi"), (PMI, "mpich"), (TORCHRUN, "torchrun"),
                                           (DEEPSPEED, "deepspeed"), (SLURM, "slurm")])
def test_every_launcher_gives_the_same_ranks(env: dict[str, str], launcher: str) -> None:
    info = discover({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"})
    assert (info.rank, info.world_size, info.local_rank, info.local_size) == (3, 4, 1, 2)
    assert (info.master_addr, info.master_port, info.launcher) == ("10.0.0.1", 29511, launcher)
    assert not info.single_node


def test_slurm_master_is_the_first_node_and_port_follows_the_job() -> None:
    info = discover(SLURM)
    assert info.master_addr == "gpu07"
    assert info.master_port == 29500 + 1234 % 1000
    assert discover({**SLURM, "SLURM_JOB_NODELIST": "a1,b2"}).master_addr == "a1"
    assert discover({**SLURM, "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "garbage"}).local_size == 2


def test_slurm_uneven_tasks_per_node() -> None:
    env = {**SLURM, "SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "2(x2),1"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.local_size) == (4, 0, 1)


def test_slurm_variables_of_the_job_step_do_not_override_mpirun() -> None:
    # mpirun inside sbatch: SLURM_PROCID=0 for every rank, OMPI_* are the truth
    info = discover({**OMPI, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "10.0.0.1"})
    assert (info.launcher, info.rank, info.world_size) == ("openmpi", 3, 4)


def test_agreeing_launchers_are_fine_and_fill_each_other() -> None:
    env = {**OMPI, "RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h0"}
    assert discover(env).launcher == "openmpi"
    partial = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
               "SLURM_NTASKS_PER_NODE": "2", "MASTER_ADDR": "h0"}  # srun --mpi=pmi2: no MPI_LOCALRANKID
    info = discover(partial)
    assert (info.launcher, info.local_rank, info.local_size) == ("mpich", 1, 2)


def test_conflicting_launchers_are_an_error_naming_both() -> None:
    with pytest.raises(RankDiscoveryError, match=r"openmpi says rank 3 of 4.*rank 0 of 4.*unset"):
        discover({**OMPI, "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h0"})
    with pytest.raises(RankDiscoveryError, match="disagree on the local rank"):
        discover({**OMPI, **{k: v for k, v in PMI.items() if k != "MPI_LOCALRANKID"}, "MPI_LOCALRANKID": "0",
                  "MASTER_ADDR": "h0"})


@pytest.mark.parametrize("env, message", [
    ({}, "nothing identifies this process's rank"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "set OMPI_COMM_WORLD_SIZE"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "outside 0..1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}, "set LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"},
     "pass --master-addr or set MASTER_ADDR"),
    ({**TORCHRUN, "MASTER_PORT": "99999"}, "not a TCP port"),
])
def test_missing_or_bad_variables_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(RankDiscoveryError, match=message):
        discover(env)


def test_one_host_defaults_to_loopback() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = discover(env)
    assert (info.master_addr, info.master_port, info.single_node) == ("127.0.0.1", 29500, True)
    # manual RANK/WORLD_SIZE on one host: local rank = rank
    info = discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert (info.local_rank, info.local_size) == (1, 2)


def test_mpi_across_hosts_needs_an_interface_or_address() -> None:
    with pytest.raises(RankDiscoveryError, match="--ifname"):
        discover(OMPI)
    with pytest.raises(RankDiscoveryError, match="rank 0 reports: .*--master-addr"):
        discover({**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, broadcast=FakeMPI())


def test_rank0_address_on_the_named_interface_is_broadcast() -> None:
    rank0 = {**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    mpi = FakeMPI()
    info = discover(rank0, ifname="lo", broadcast=mpi)
    addr, port, error = mpi.calls[0]
    assert (addr, error) == ("127.0.0.1", None) and 1 <= port <= 65535
    assert (info.master_addr, info.master_port, info.ifname) == ("127.0.0.1", port, "lo")
    # another rank sends nothing and takes rank 0's values; the interface may come from GLOO_SOCKET_IFNAME
    other = FakeMPI(rank0_value=("10.1.2.3", 4242, None))
    info = discover({**OMPI, "GLOO_SOCKET_IFNAME": "lo"}, broadcast=other)
    assert other.calls == [(None, None, None)]
    assert (info.master_addr, info.master_port, info.ifname) == ("10.1.2.3", 4242, "lo")


def test_rank0_errors_reach_every_rank_instead_of_a_hang() -> None:
    rank0 = {**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    with pytest.raises(RankDiscoveryError, match="rank 0 reports: network interface 'nosuchif0'"):
        discover(rank0, ifname="nosuchif0", broadcast=FakeMPI())
    other = FakeMPI(rank0_value=(None, None, "rank 0 broke"))
    with pytest.raises(RankDiscoveryError, match="rank 0 reports: rank 0 broke"):
        discover(OMPI, ifname="lo", broadcast=other)
    # mpi4py's MPI is not mpirun's: every process is rank 0 of a world of one and receives nothing
    with pytest.raises(RankDiscoveryError, match="did not arrive over MPI"):
        discover(OMPI, ifname="lo", broadcast=FakeMPI())


def test_slurm_never_broadcasts() -> None:
    mpi = FakeMPI()
    info = discover({**SLURM, "GLOO_SOCKET_IFNAME": "lo"}, broadcast=mpi)
    assert mpi.calls == [] and info.master_addr == "gpu07" and info.ifname == "lo"


def test_flags_beat_the_environment_and_skip_the_broadcast() -> None:
    mpi = FakeMPI()
    info = discover({**OMPI, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "1"}, master_addr="10.0.0.1",
                    master_port=2345, ifname="lo", broadcast=mpi)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 2345)
    assert mpi.calls == []
    assert discover({**TORCHRUN, "NCCL_SOCKET_IFNAME": "lo"}).ifname == "lo"


def test_ifname_resolution_on_loopback() -> None:
    assert interface_ipv4("lo") == "127.0.0.1"
    assert interface_ipv4("lo,eth9") == "127.0.0.1"  # GLOO_SOCKET_IFNAME may list several
    with pytest.raises(RankDiscoveryError, match=r"'nosuchif0' has no IPv4 address or does not exist.*interfaces:.*lo"):
        interface_ipv4("nosuchif0")
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    assert discover(env, ifname="lo").master_addr == "127.0.0.1"


def test_apply_sets_what_torch_and_deepspeed_read() -> None:
    env: dict[str, str] = {"NCCL_SOCKET_IFNAME": "ib0"}
    apply(RankInfo(3, 4, 1, 2, "10.0.0.1", 29511, "openmpi", ifname="eth1"), env)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511", "GLOO_SOCKET_IFNAME": "eth1",
                   "NCCL_SOCKET_IFNAME": "ib0"}
    # DeepSpeed skips its own MPI discovery (hostname -I) when these are all set
    assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"} <= set(env)
    assert discover(env).rank == 3  # what apply wrote is discoverable again


def test_init_distributed_single_process_gloo() -> None:
    code = ("import torch.distributed as dist\n"
            "from compact_hooks.launcher.mpi import init_distributed\n"
            "g = init_distributed(timeout_s=30)\n"
            "assert dist.get_backend(g) == 'gloo' and dist.get_world_size(g) == 1\n"
            "assert init_distributed() is g\n"
            "print('ok')\n")
    env = {"PATH": "/usr/bin:/bin", "RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# -- hostfile ----------------------------------------------------------------------------------------------------


def test_hostfile_deepspeed_and_mpi_format() -> None:
    text = "# cluster\nworker-0 slots=4\n\n  worker-1 slots=2 max_slots=8  # trailing comment\n"
    assert parse_hostfile(text) == [Host("worker-0", 4), Host("worker-1", 2)]


@pytest.mark.parametrize("text, message", [
    ("", "names no hosts"),
    ("# only a comment\n", "names no hosts"),
    ("worker-0\n", r"line 1 .*no slots=N; write 'worker-0 slots=1'"),
    ("worker-0 slots=two\n", "slots must be a positive integer"),
    ("worker-0 slots=0\n", "slots must be a positive integer"),
    ("worker-0 gpus=2\n", "unknown entry 'gpus=2'"),
    ("slots=2\n", "starts with the host name"),
    ("a slots=1\nb slots=1\na slots=2\n", "line 3 .*listed twice"),
])
def test_malformed_hostfiles_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse_hostfile(text)


def test_missing_hostfile(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot read the hostfile"):
        launch.read_hostfile(tmp_path / "nope")


# -- dry-run command lines ---------------------------------------------------------------------------------------

PY = sys.executable
CTX = Context(environ={"PYTHONPATH": "/src", "HOME": "/root"}, executable=PY, hostname="head",
              cpu_count=2, is_root=True)


def plan_for(argv: list[str], ctx: Context = CTX) -> launch.Plan:
    return build_plan(parse_args(argv), ctx)


@pytest.fixture
def hostfile(tmp_path: Path) -> str:
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode0 slots=2\nnode1 slots=2\nnode2 slots=2\n")
    return str(path)


def test_dry_run_prints_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(parse_args(["--launcher", "torchrun", "--dry-run", "--", "python", "x.py"])) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node 1" in out and out.rstrip().endswith("x.py")


def test_error_is_printed_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(parse_args(["--launcher", "torchrun", "--dry-run"])) == 2
    assert "no command to launch" in capsys.readouterr().err


def test_mpirun_across_hosts(hostfile: str) -> None:
    plan = plan_for(["--launcher", "mpirun", "--hostfile", hostfile, "--nnodes", "2", "--ifname", "eth1",
                     "--master-port", "29600", "--", "python", "-u", "infer.py", "--steps", "3"])
    argv = plan.argv
    assert plan.env == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert argv[argv.index("-np") + 1] == "4"
    assert argv[argv.index("--host") + 1] == "node0:2,node1:2"
    assert argv[argv.index("--bind-to") + 1] == "none"
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert exported == ["MASTER_PORT=29600", "GLOO_SOCKET_IFNAME=eth1", "NCCL_SOCKET_IFNAME=eth1", "PYTHONPATH"]
    assert "MASTER_ADDR" not in " ".join(exported)  # rank 0 shares its eth1 address over MPI
    assert ["--mca", "btl_tcp_if_include", "eth1"] == argv[argv.index("--mca"):argv.index("--mca") + 3]
    assert "--oversubscribe" not in argv
    assert argv[-5:] == [PY, "-u", "infer.py", "--steps", "3"]
    assert shlex.split(plan.render().splitlines()[-1])[2:] == argv


def test_mpirun_uses_the_mpirun_next_to_python(tmp_path: Path) -> None:
    (tmp_path / "mpirun").write_text("")
    ctx = Context({}, str(tmp_path / "python"), "head", 8, False)
    plan = plan_for(["--launcher", "mpirun", "--nproc-per-node", "2", "--", "compact-hooks", "bench"], ctx)
    assert plan.argv[0] == str(tmp_path / "mpirun") and plan.env == {}
    assert plan.argv[-2:] == ["compact-hooks", "bench"]  # no sibling compact-hooks: left to PATH


def test_mpirun_oversubscribes_beyond_the_cores() -> None:
    plan = plan_for(["--launcher", "mpirun", "--nproc-per-node", "3", "--master-addr", "10.0.0.1", "--", "a.py"])
    assert "--oversubscribe" in plan.argv and "-x" in plan.argv and "MASTER_ADDR=10.0.0.1" in plan.argv
    assert plan.argv[-3:] == [PY, "-u", "a.py"]


def test_mpirun_across_hosts_without_interface_or_address_is_refused(hostfile: str) -> None:
    with pytest.raises(LaunchError, match="--ifname IF .* or --master-addr"):
        plan_for(["--launcher", "mpirun", "--hostfile", hostfile, "--", "x.py"])


def test_mpirun_mpich_flavor(hostfile: str) -> None:
    ctx = Context(CTX.environ, PY, "head", 2, True, flavor="mpich")
    argv = plan_for(["--launcher", "mpirun", "--hostfile", hostfile, "--nproc-per-node", "1",
                     "--master-addr", "10.0.0.1", "--", "x.py"], ctx).argv
    assert argv[1:5] == ["-n", "3", "-hosts", "node0:1,node1:1,node2:1"]
    assert ["-genv", "MASTER_ADDR", "10.0.0.1"] == argv[5:8]
    assert argv[argv.index("-genvlist") + 1] == "PYTHONPATH"


def test_deepspeed_one_host() -> None:
    plan = plan_for(["--launcher", "deepspeed", "--nproc-per-node", "2", "--", "python", "x.py", "--a"])
    assert plan.argv[-4:] == ["--num_gpus", "2", "x.py", "--a"]  # the launcher appends --local_rank=K
    plan = plan_for(["--launcher", "deepspeed", "--", "compact-hooks", "run", "c.json"])
    assert plan.argv[-5:-3] == ["--no_python", "--no_local_rank"] and plan.argv[-2:] == ["run", "c.json"]
    assert plan.argv[-3].endswith("compact-hooks")  # the one next to python when it is there
    plan = plan_for(["--launcher", "deepspeed", "--", "python", "-m", "pkg.mod", "--x"])
    assert plan.argv[-3:] == ["--module", "pkg.mod", "--x"]


def test_deepspeed_across_hosts(hostfile: str) -> None:
    plan = plan_for(["--launcher", "deepspeed", "--hostfile", hostfile, "--nnodes", "2", "--nproc-per-node", "1",
                     "--master-addr", "10.0.0.1", "--ifname", "ib0", "--", "x.py"])
    a = plan.argv
    assert a[a.index("--hostfile") + 1] == hostfile
    assert a[a.index("--num_nodes") + 1] == "2" and a[a.index("--num_gpus") + 1] == "1"
    assert a[a.index("--master_addr") + 1] == "10.0.0.1"
    assert plan.env_file == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}  # via DS_ENV_FILE
    assert plan.render().startswith("# DS_ENV_FILE=")
    with pytest.raises(LaunchError, match=r"pass --master-addr .*hostname -I"):
        plan_for(["--launcher", "deepspeed", "--hostfile", hostfile, "--", "x.py"])


def test_deepspeed_master_from_the_interface_when_rank0_is_here(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("head slots=1\nother slots=1\n")
    plan = plan_for(["--launcher", "deepspeed", "--hostfile", str(path), "--ifname", "lo", "--", "x.py"])
    assert plan.argv[plan.argv.index("--master_addr") + 1] == "127.0.0.1"


def test_torchrun_across_hosts(hostfile: str) -> None:
    ctx = Context({}, PY, "node1", 2, False)
    plan = plan_for(["--launcher", "torchrun", "--hostfile", hostfile, "--master-addr", "10.0.0.1",
                     "--", "compact-hooks", "run", "c.json"], ctx)
    a = plan.argv
    assert a[:3] == [PY, "-m", "torch.distributed.run"]
    assert [a[a.index(f) + 1] for f in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr")] == \
        ["3", "2", "1", "10.0.0.1"]
    assert a[-4] == "--no-python" and a[-3].endswith("compact-hooks") and a[-2:] == ["run", "c.json"]
    with pytest.raises(LaunchError, match="--master-addr"):
        plan_for(["--launcher", "torchrun", "--hostfile", hostfile, "--", "x.py"], ctx)
    with pytest.raises(LaunchError, match="pass --node-rank"):
        plan_for(["--launcher", "torchrun", "--hostfile", hostfile, "--master-addr", "a", "--", "x.py"])


def test_node_rank_is_torchrun_only() -> None:
    with pytest.raises(LaunchError, match="--node-rank is for --launcher torchrun"):
        plan_for(["--launcher", "mpirun", "--node-rank", "1", "--", "x.py"])


def test_nnodes_beyond_the_hostfile(hostfile: str) -> None:
    with pytest.raises(LaunchError, match="--nnodes 5 but the hostfile names 3 hosts"):
        plan_for(["--launcher", "mpirun", "--hostfile", hostfile, "--nnodes", "5", "--", "x.py"])


def test_registers_on_the_cli() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="compact-hooks")
    sub = parser.add_subparsers(dest="command")
    launch.add_parser(sub)
    args = parser.parse_args(["launch", "--launcher", "mpirun", "--dry-run", "--", "x.py", "--launcher", "y"])
    assert args.handler is launch.main and args.argv[-3:] == ["x.py", "--launcher", "y"]


def test_launch_returns_a_failing_rank_exit_code() -> None:
    code = "import os, sys; sys.exit(3 if os.environ['OMPI_COMM_WORLD_RANK'] == '1' else 0)"
    args = parse_args(["--launcher", "mpirun", "--nproc-per-node", "2", "--", "python", "-c", code])
    assert launch.main(args) == 3


@pytest.mark.parametrize("banner, flavor", [("mpirun (Open MPI) 5.0.11", "openmpi"),
                                            ("mpirun (Open MPI) 4.1.4", "openmpi4"),
                                            ("HYDRA build details:\n    Version: 4.1.2", "mpich")])
def test_mpi_flavor(tmp_path: Path, banner: str, flavor: str) -> None:
    fake = tmp_path / "mpirun"
    fake.write_text(f"#!/bin/sh\necho '{banner}'\n")
    fake.chmod(0o755)
    assert launch.mpi_flavor(str(fake)) == flavor


def test_open_mpi_4_runtime_options(hostfile: str) -> None:
    ctx = Context(CTX.environ, PY, "head", 2, False, flavor="openmpi4")
    argv = plan_for(["--launcher", "mpirun", "--hostfile", hostfile, "--ifname", "eth1", "--", "x.py"], ctx).argv
    assert "--prtemca" not in argv and argv[argv.index("oob_tcp_if_include") - 1] == "--mca"
