"""DeepSpeed tensor parallel through compact-hooks under the real DeepSpeed launcher (CPU, gloo).

The module is its own worker: ``deepspeed --num_gpus N tests/test_deepspeed_tp.py OUT`` runs
:func:`worker` on every rank with ``tp_size`` 2, so 2 ranks form one TP group and 4 ranks form two TP
groups of 2 (fed different inputs, so a collective that ignored the group would show). Every rank
records its checks; the launcher's rank 0 gathers them into one JSON that the tests read.
AutoTP shards a tiny ``LlamaForCausalLM``; a tiny diffusers Flux transformer is sharded with
:func:`flux_tp_policy`. Config-only checks run in-process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from compact_hooks.launcher.local import free_port

ROOT = Path(__file__).resolve().parents[1]
TP_CONFIG = ROOT / "examples" / "configs" / "tp_int8.json"
TIMEOUT_S = 240
STEPS = 10
FLUX_BOUNDS = {"int8": 0.01, "int2": 0.15}  # max relative output error over 10 drifting steps
LLAMA_INT8_BOUND = 0.05  # new tokens after the warm-up step: a large residual, quantized
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def launch(nprocs: int, out: Path, timeout: int = TIMEOUT_S) -> dict[str, Any]:
    """Run this file under ``deepspeed --num_gpus nprocs`` on CPU; return the gathered JSON."""
    exe = Path(sys.executable).parent / "deepspeed"
    cmd = [str(exe), "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    results = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or not results.get("done"):
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"deepspeed launch failed (rc {proc.returncode}); results so far {results}\n{tail}")
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks-2groups"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp(f"tp{request.param}") / "results.json"
    results = launch(request.param, out)
    assert len(results["ranks"]) == request.param
    return results["ranks"]


# ---------------------------------------------------------------------------------------------
# Tests on the launched results
# ---------------------------------------------------------------------------------------------


def test_tp_groups(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        first = (r["rank"] // 2) * 2
        assert r["llama"]["group"] == [first, first + 1]
        assert r["flux"]["group"] == [first, first + 1]


def test_llama_autotp_sites(ranks: list[dict[str, Any]]) -> None:
    r = ranks[0]["llama"]
    assert r["keys"] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                         "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert r["calls_per_forward"] == 5
    assert r["warmup_vs_unsharded"] < ATOL
    assert r["hook"] == "CompactHook" and r["compressor"] == "int8"


def test_llama_none_matches_unsharded(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["llama"]["none_vs_unsharded"] < ATOL
        assert r["llama"]["none_equals_deepspeed"]
        assert r["llama"]["passthrough_equals_deepspeed"]


def test_llama_int8_bounded(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert 0 < r["llama"]["int8_rel_error"] < LLAMA_INT8_BOUND


def test_llama_remove_restores(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["llama"]["restored_equals_deepspeed"]
        assert r["llama"]["forwards_after_remove"] == 0


def test_flux_policy_sites(ranks: list[dict[str, Any]]) -> None:
    r = ranks[0]["flux"]
    assert r["keys"] == [f"transformer_blocks.{i}.{n}" for i in range(2)
                         for n in ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")] + \
        [f"single_transformer_blocks.{i}.proj_out" for i in range(2)]
    assert r["replicated_modulation"], "AdaLayerNorm linears must stay whole"


def test_flux_none_matches_unsharded(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["flux"]["none_vs_unsharded"] < ATOL
        assert r["flux"]["none_equals_deepspeed"]


@pytest.mark.parametrize("codec", sorted(FLUX_BOUNDS))
def test_flux_lossy_bounded(ranks: list[dict[str, Any]], codec: str) -> None:
    for r in ranks:
        errors = r["flux"]["lossy"][codec]["errors"]
        assert errors[0] < ATOL, "the warm-up step is exact"
        assert max(errors) < FLUX_BOUNDS[codec], errors
        assert max(errors[5:]) < 2 * max(errors[1:5]), f"error feedback keeps the error bounded: {errors}"


@pytest.mark.parametrize("codec", sorted(FLUX_BOUNDS))
def test_flux_wire_bytes_match_payload_nbytes(ranks: list[dict[str, Any]], codec: str) -> None:
    r = ranks[0]["flux"]["lossy"][codec]
    assert r["wire_per_step"][1:] == [r["expected_wire_per_step"]] * (STEPS - 1)
    assert r["expected_wire_per_step"] < r["raw_per_step"]


def test_flux_remove_restores(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["flux"]["restored_equals_deepspeed"]


# ---------------------------------------------------------------------------------------------
# In-process config checks (no launch)
# ---------------------------------------------------------------------------------------------


def test_bad_block_names_the_key() -> None:
    pytest.importorskip("deepspeed")
    import torch
    from compact_hooks.integrations.deepspeed import init_inference

    import compact_hooks as ch

    bad = {"tensor_parallel": {"tp_size": 2}, "compact_hooks": {"compresor": "int8"}}
    with pytest.raises(ch.ConfigError, match=r"compact_hooks\.compresor"):
        init_inference(torch.nn.Linear(4, 4), bad)
    with pytest.raises(ch.ConfigError, match=r"compact_hooks\.warmup_steps"):
        init_inference(torch.nn.Linear(4, 4), {"compact_hooks": {"warmup_steps": -1}})


def test_config_file_passes_deepspeed_validation() -> None:
    pytest.importorskip("deepspeed")
    from compact_hooks.integrations.deepspeed import compact_config, ds_config_without_block
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    from deepspeed.runtime.config import DeepSpeedConfig

    stripped = ds_config_without_block(TP_CONFIG)
    assert "compact_hooks" not in stripped and stripped["tensor_parallel"] == {"tp_size": 2}
    assert compact_config(TP_CONFIG).compressor == "int8"
    DeepSpeedInferenceConfig(**stripped)
    with pytest.raises(Exception, match="compact_hooks"):
        DeepSpeedInferenceConfig(**json.loads(TP_CONFIG.read_text()))  # why the block must be stripped
    # deepspeed.initialize-style configs keep working with the block in them
    training = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                "compact_hooks": {"compressor": "int2"}}
    assert DeepSpeedConfig(copy.deepcopy(training)).train_batch_size == 2


def test_kwargs_conflict_is_reported() -> None:
    pytest.importorskip("deepspeed")
    import torch
    from compact_hooks.integrations.deepspeed import init_inference

    with pytest.raises(ValueError, match="'dtype' is set both"):
        init_inference(torch.nn.Linear(4, 4), {"dtype": "fp32"}, dtype="fp16")


# ---------------------------------------------------------------------------------------------
# Worker (runs under the deepspeed launcher)
# ---------------------------------------------------------------------------------------------


def _rel(a: Any, b: Any) -> float:
    import torch

    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def _maxdiff(a: Any, b: Any) -> float:
    return (a - b).abs().max().item()


def _llama(seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _count_forwards(hook: Any) -> int:
    return sum(k["calls"] for k in hook.stats().get("per_key", {}).values())


def _check_llama(group_index: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from compact_hooks.integrations.deepspeed import attach_tensor_parallel, init_inference

    import compact_hooks as ch

    model = _llama(0)
    unsharded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(100 + group_index)
    ids, ids_next = torch.randint(0, 128, (2, 12), generator=gen), torch.randint(0, 128, (2, 12), generator=gen)
    logits = lambda m, x=ids: m(x).logits  # noqa: E731
    with torch.no_grad():
        ref = logits(unsharded)
        ds_config = json.loads(TP_CONFIG.read_text())  # the DeepSpeed JSON with its compact_hooks block,
        ds_config["compact_hooks"]["warmup_compressor"] = None  # with a full (exact) warm-up step
        engine = init_inference(model, ds_config)
        handle = engine.compact_hooks
        warmup_diff = _maxdiff(logits(engine), ref)  # the warm-up step sends full tensors
        found: dict[str, Any] = {"keys": handle.keys, "calls_per_forward": _count_forwards(handle.hook),
                                 "hook": type(handle.hook).__name__,
                                 "compressor": handle.hook.stats()["compressor"]["name"],
                                 "group": dist.get_process_group_ranks(handle.tp_group),
                                 "warmup_vs_unsharded": warmup_diff}
        handle.next_step()
        out_int8 = logits(engine, ids_next)  # after the warm-up step: a compressed residual
        handle.remove()
        out_ds = logits(engine)  # DeepSpeed's own LinearAllreduce.forward
        found["int8_rel_error"] = _rel(out_int8, logits(engine, ids_next))
        for name, hook in (("none", ch.CompactHook({"compressor": "none"})), ("passthrough", ch.PassthroughHook())):
            h = attach_tensor_parallel(engine, hook)
            out = logits(engine)
            found[f"{name}_equals_deepspeed"] = torch.equal(out, out_ds)
            found[f"{name}_vs_unsharded"] = _maxdiff(out, ref)
            h.remove()
        probe = ch.CompactHook({"compressor": "none"})
        h = attach_tensor_parallel(engine, probe)
        h.remove()
        found["restored_equals_deepspeed"] = torch.equal(logits(engine), out_ds)
        found["forwards_after_remove"] = _count_forwards(probe)
    return found


def _flux(seed: int) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def _flux_inputs(step: int, group_index: int) -> dict[str, Any]:
    """One 'denoising step': latents drift slowly; text and timestep follow the step."""
    import torch

    g = torch.Generator().manual_seed(500 + group_index)
    base, drift = torch.randn(1, 16, 4, generator=g), torch.randn(1, 16, 4, generator=g)
    text, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    return dict(hidden_states=base + 0.05 * step * drift, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([1.0 - step / (2 * STEPS)]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), return_dict=False)


def _flux_lossy(engine: Any, unsharded: Any, group_index: int, codec: str, size: int) -> dict[str, Any]:
    import torch
    from compact_hooks.integrations.deepspeed import attach_tensor_parallel

    import compact_hooks as ch

    hook = ch.CompactHook({"compressor": codec, "residual": "ef", "warmup_steps": 1, "warmup_compressor": None})
    handle = attach_tensor_parallel(engine, hook)
    key = "transformer_blocks.0.attn.to_out.0"
    errors, wire, raw = [], [], 0
    for step in range(STEPS):
        inputs = _flux_inputs(step, group_index)
        before = hook.stats()["per_key"].get(key, {"wire_bytes": 0, "raw_bytes": 0})
        out = engine(**inputs)[0]
        after = hook.stats()["per_key"][key]
        hook.next_step()
        errors.append(_rel(out, unsharded(**inputs)[0]))
        wire.append(after["wire_bytes"] - before["wire_bytes"])
        raw = after["raw_bytes"] - before["raw_bytes"]
    handle.remove()
    rows = 16  # [1, 16 image tokens, hidden 64] -> rows of 64, split over the group
    chunk = (-(-rows // size), 64)
    expected = (size - 1) * 2 * ch.build_compressor(codec).payload_nbytes(chunk, torch.float32)
    return {"errors": errors, "wire_per_step": wire, "raw_per_step": raw, "expected_wire_per_step": expected}


def _check_flux(group_index: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from compact_hooks.integrations.deepspeed import attach_tensor_parallel, flux_tp_policy, init_inference

    import compact_hooks as ch

    model = _flux(0)
    unsharded = copy.deepcopy(model)
    config = {"tensor_parallel": {"tp_size": 2}, "dtype": "fp32", "replace_with_kernel_inject": False,
              "compact_hooks": {"compressor": "none"}}
    inputs = _flux_inputs(0, group_index)
    with torch.no_grad():
        ref = unsharded(**inputs)[0]
        engine = init_inference(model, config, tp_policy=flux_tp_policy())
        handle = engine.compact_hooks
        out_none = engine(**inputs)[0]
        found: dict[str, Any] = {"keys": handle.keys, "group": dist.get_process_group_ranks(handle.tp_group),
                                 "none_vs_unsharded": _maxdiff(out_none, ref)}
        block = engine.module.transformer_blocks[0]
        found["replicated_modulation"] = type(block.norm1.linear) is torch.nn.Linear
        handle.remove()
        out_ds = engine(**inputs)[0]
        found["none_equals_deepspeed"] = torch.equal(out_none, out_ds)
        size = dist.get_world_size(handle.tp_group)
        found["lossy"] = {c: _flux_lossy(engine, unsharded, group_index, c, size) for c in FLUX_BOUNDS}
        h = attach_tensor_parallel(engine, ch.PassthroughHook())
        h.remove()
        found["restored_equals_deepspeed"] = torch.equal(engine(**inputs)[0], out_ds)
    return found


def worker(out_path: str) -> None:
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank = dist.get_rank()
    mine = {"rank": rank, "llama": _check_llama(rank // 2)}
    mine["flux"] = _check_flux(rank // 2)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered, "done": True}, indent=1))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left to interpreter teardown can abort the process


if __name__ == "__main__":
    worker(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
