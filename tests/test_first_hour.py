"""What a new user meets in the first hour: ``compact_hooks.init_distributed()`` under mpirun and Slurm,
per-rank CPU threads, ``compact-hooks run`` without a launcher, misspelt config blocks, the uncompressed
baseline's byte counts, ``bench quality`` / ``run`` on a model directory of one's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compact_hooks.launcher.netns import mpirun_path

import compact_hooks as ch
from compact_hooks.distributed import rank_threads, set_rank_threads
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "first_hour_worker.py"
MARK = "@@RESULT "
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID", "CROSS_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (and without OMP_NUM_THREADS), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **extra}


def result_of(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, out[-3000:]
    return json.loads(lines[0][len(MARK):])


def check_quickstart(res: dict) -> None:
    assert res["world_size"] == 2
    assert sorted(r["rank"] for r in res["ranks"]) == [0, 1]
    assert sorted(r["local_rank"] for r in res["ranks"]) == [0, 1]
    assert res["wire_bytes"] < res["raw_bytes"] / 2  # int2 residuals after the warm-up step
    assert max(res["rel_errors"]) < 0.05


# -- init_distributed ---------------------------------------------------------------------------------------------


def test_init_distributed_is_exported_at_top_level():
    assert "init_distributed" in ch.__all__ and callable(ch.init_distributed)


def test_init_distributed_under_mpirun():
    """mpirun sets only OMPI_COMM_WORLD_*: the address and port travel from rank 0 over MPI."""
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun_path(), "--oversubscribe", "--bind-to", "none", "-np", "2", sys.executable,
                           str(WORKER)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = result_of(proc.stdout)
    check_quickstart(res)
    # OMP_NUM_THREADS unset: each of the 2 ranks on this host gets cores // 2 threads
    assert all(r["omp"] is None and r["threads"] == rank_threads(2) for r in res["ranks"])


def test_init_distributed_from_slurm_variables():
    """Two processes started with srun's variables set by hand (no other launcher's)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                        SLURM_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                        SLURM_JOB_ID="77", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o + e for o, e in outs)[-4000:]
    res = result_of(outs[0][0])
    check_quickstart(res)
    assert all(r["omp"] == "1" and r["threads"] == 1 for r in res["ranks"])  # a set variable rules


def test_init_distributed_without_a_launcher_says_how_to_launch():
    code = "import compact_hooks as ch; ch.init_distributed()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "RankDiscoveryError" in proc.stderr and "mpirun" in proc.stderr and "torchrun" in proc.stderr


def test_rank_threads_split_the_cores():
    assert rank_threads(2, cores=16) == 8 and rank_threads(3, cores=16) == 5 and rank_threads(32, cores=16) == 1
    with pytest.raises(ValueError, match="local_size"):
        rank_threads(0, cores=4)
    before = torch.get_num_threads()
    try:
        assert set_rank_threads(2, environ={"OMP_NUM_THREADS": "3"}) is None
        assert torch.get_num_threads() == before
        assert set_rank_threads(environ={"LOCAL_WORLD_SIZE": "64"}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- compact-hooks run on one process -----------------------------------------------------------------------------


def test_run_without_a_launcher_refuses_and_says_how_to_launch(tmp_path):
    config = ROOT / "examples" / "configs" / "diffusers_ulysses_int2.json"
    proc = subprocess.run([sys.executable, "-m", "compact_hooks.cli", "run", "--config", str(config), "--out",
                           str(tmp_path)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    for launcher in ("torchrun --nproc-per-node 2", "deepspeed --num_gpus 2", "mpirun -np 2", "--single-process"):
        assert launcher in proc.stderr, proc.stderr[-2000:]
    assert "nothing would run in parallel" in proc.stderr
    assert not (tmp_path / "stats.json").exists()


# -- misspelt config blocks and keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["compact_hook", "compactHooks", "compact-hooks", "compacthooks"])
def test_misspelt_block_is_named_with_the_right_spelling(tmp_path, name):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1, name: {"compressor": "int4"}}))
    with pytest.raises(ch.ConfigError, match=f"{name}: unknown block; did you mean \"compact_hooks\""):
        ch.load_config(path)


def test_misspelt_block_in_a_deepspeed_config_is_named():
    pytest.importorskip("deepspeed")
    from compact_hooks.integrations.deepspeed import inference

    with pytest.raises(ch.ConfigError, match="compact_hook: unknown block; did you mean \"compact_hooks\""):
        inference.compact_config({"tensor_parallel": {"tp_size": 2}, "compact_hook": {"compressor": "int4"}})
    # no block at all: DeepSpeed's convention for a missing feature block, plain collectives
    assert inference.compact_config({"tensor_parallel": {"tp_size": 2}}).enabled is False


@pytest.mark.parametrize("block, where, model, close", [
    ({"stats": {"enable": True}}, "compact_hooks.stats.enable", "StatsConfig", "enabled"),
    ({"rules": [{"match": {"keys": "a*"}}]}, "compact_hooks.rules[0].match.keys", "RuleMatch", "key"),
    ({"rules": [{"plain": True, "warmup": 1}]}, "compact_hooks.rules[0].warmup", "Rule", None),
    ({"compresor": "int2"}, "compact_hooks.compresor", "CompactConfig", "compressor"),
])
def test_unknown_nested_keys_list_the_valid_keys(block, where, model, close):
    from compact_hooks import config, policy

    fields = getattr(config, model, None) or getattr(policy, model)
    with pytest.raises(ch.ConfigError) as info:
        ch.load_config({"compact_hooks": block})
    assert info.value.key_path == where
    assert f"known keys: {', '.join(sorted(fields.model_fields))}" in str(info.value)
    assert close is None or f"did you mean {close!r}?" in str(info.value)


def test_job_says_when_the_config_has_no_block(tmp_path):
    from compact_hooks.integrations.diffusers.job import block_note

    bare, empty, full = tmp_path / "bare.json", tmp_path / "empty.json", tmp_path / "full.json"
    bare.write_text('{"compressor": "int4"}')
    empty.write_text("{}")
    full.write_text('{"compact_hooks": {}}')
    assert block_note(str(full)) is None
    assert "no \"compact_hooks\" block" in block_note(str(bare)) and "1 set" in block_note(str(bare))
    assert "defaults" in block_note(str(empty)) and "every key" in block_note(str(empty))


# -- the uncompressed baseline's byte counts -----------------------------------------------------------------------


def plain_stats_worker(rank: int, world: int) -> dict:
    hooks = {"passthrough": ch.PassthroughHook(), "cast": ch.CastHook(torch.bfloat16)}
    x = torch.randn(2 * world, 64)
    for _ in range(2):
        for hook in hooks.values():
            for op in ("all_gather", "all_to_all", "all_reduce", "ring_exchange"):
                hook(ch.CollectiveCall(op, x, None, key=f"blocks.0.attn:{op}"))
            hook(ch.CollectiveCall("all_gather", x, None))  # no key: all_gather#0
            hook.next_step()
    return {name: hook.stats() for name, hook in hooks.items()}


def test_passthrough_and_cast_hooks_count_bytes_like_other_hooks():
    from compact_hooks.collectives import plain_bytes
    from tests.distributed import run_ranks

    world = 2
    nbytes = 2 * world * 64 * 4
    for res in run_ranks(plain_stats_worker, world):
        p, c = res["passthrough"], res["cast"]
        assert p["hook"] == "passthrough" and p["calls"] == 10 and len(p["per_step"]) == 2
        for op in ("all_gather", "all_to_all", "all_reduce", "ring_exchange"):
            k = p["per_key"][f"blocks.0.attn:{op}"]
            assert k["raw_bytes"] == k["wire_bytes"] == 2 * plain_bytes(op, nbytes, world)
            assert c["per_key"][f"blocks.0.attn:{op}"]["wire_bytes"] * 2 == k["raw_bytes"]  # bfloat16 on the wire
        assert p["per_key"]["all_gather#0"]["raw_bytes"] == 2 * plain_bytes("all_gather", nbytes, world)
        assert p["raw_bytes"] == p["wire_bytes"] > 0 and p["compression_ratio"] == 1.0
        assert c["compression_ratio"] == 2.0


# -- a model directory of one's own ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    """A tiny random FluxTransformer2DModel saved as save_pretrained writes it (config.json + weights)."""
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    path = tmp_path_factory.mktemp("my-flux")
    model.save_pretrained(path)
    return path


def test_bench_quality_on_a_transformer_directory(transformer_dir, tmp_path):
    pytest.importorskip("skimage")
    from safetensors.torch import save_file

    from compact_hooks.bench import quality

    g = torch.Generator().manual_seed(5)
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 16, generator=g)},
              str(embeds))
    r = quality.run(steps=3, seeds=(0,), world=2, out=tmp_path, methods=["compact int2", "compact int4"],
                    model=str(transformer_dir), prompt_embeds=str(embeds), height=64, width=64)
    assert r["model"] == transformer_dir.name and r["images_per_method"] == 2 and r["classes"] is None
    by = {m["name"]: m for m in r["methods"]}
    assert by["uncompressed"]["psnr_db"] is None and by["uncompressed"]["class_accuracy"] is None
    for name in ("compact int2", "compact int4"):
        assert by[name]["ratio"] > 2 and 20 < by[name]["psnr_db"] < 120
    assert by["compact int4"]["psnr_db"] > by["compact int2"]["psnr_db"]
    assert (tmp_path / "quality.png").exists()
    # random embeddings from a seed when no file is given; a file of the wrong width is refused
    spec = quality.model_spec(str(transformer_dir), None, 3, 7)
    assert spec["embeds"]["prompt_embeds"].shape[::2] == (3, 32) and spec["embeds"]["pooled_prompt_embeds"].shape == (3, 16)
    save_file({"prompt_embeds": torch.zeros(2, 8, 31), "pooled_prompt_embeds": torch.zeros(2, 16)}, str(embeds))
    with pytest.raises(ValueError, match=r"expected \[N, T, 32\]"):
        quality.model_spec(str(transformer_dir), str(embeds), 1, 0)


def test_run_takes_a_transformer_directory(transformer_dir, tmp_path):
    config = ROOT / "examples" / "configs" / "diffusers_ulysses_int2.json"
    proc = subprocess.run([sys.executable, "-m", "compact_hooks.cli", "run", "--config", str(config), "--model",
                           str(transformer_dir), "--single-process", "--steps", "2", "--height", "64", "--width", "64",
                           "--out", str(tmp_path)], cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["model"] == transformer_dir.name and stats["world_size"] == 1 and stats["steps"] == 2
    assert (stats["height"], stats["width"]) == (8, 8)  # the latent: 64 / 8
    assert stats["quality"]["identical"] is True  # one process: nothing on the wire, nothing lost
