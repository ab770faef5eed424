"""DeepSpeed tensor parallel (AutoTP layers) with compressed all-reduces, under the DeepSpeed launcher.

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 examples/deepspeed_tp.py \
        --deepspeed_config examples/configs/tp_int8.json

The same command without ``DS_ACCELERATOR=cpu`` runs on GPUs (nccl). The config is a DeepSpeed
inference config with a ``"compact_hooks"`` block; ``tensor_parallel.tp_size`` smaller than the
number of ranks gives several TP groups (``--num_gpus 4`` with tp_size 2: two groups of 2).

``--model flux`` (default) shards a small diffusers Flux transformer with the explicit
:func:`flux_tp_policy` (AutoTP's parser cannot handle Flux) and runs ``--steps`` denoising-like
steps on slowly drifting latents; ``--model llama`` lets AutoTP shard a small LlamaForCausalLM.
The same inputs also go through a PassthroughHook on the same sharded model; rank 0 prints a summary.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from compact_hooks.integrations import deepspeed as chds

import compact_hooks as ch
from compact_hooks.distributed import set_rank_threads

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "tp_int8.json"


def parse_args() -> argparse.Namespace:
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--model", choices=["flux", "llama"], default="flux")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (flux) or sequence length (llama)")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    args.deepspeed_config = args.deepspeed_config or str(DEFAULT_CONFIG)
    return args


def flux_model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=64, num_attention_heads=4, joint_attention_dim=128,
                                  pooled_projection_dim=128, axes_dims_rope=[16, 24, 24]).eval()


def flux_inputs(step: int, args: argparse.Namespace, device: torch.device, seed: int) -> dict[str, Any]:
    """Denoising-like step: latents drift slowly, the timestep goes down."""
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.randn(1, args.tokens, 16, generator=g), torch.randn(1, args.tokens, 16, generator=g)
    text, pooled = torch.randn(1, 32, 128, generator=g), torch.randn(1, 128, generator=g)
    pos = torch.arange(args.tokens, dtype=torch.float32)
    side = max(1, int(args.tokens ** 0.5))
    img_ids = torch.stack([torch.zeros_like(pos), pos // side, pos % side], dim=-1)  # (0, row, column)
    tensors = dict(hidden_states=base + 0.05 * step * drift, encoder_hidden_states=text, pooled_projections=pooled,
                   timestep=torch.tensor([1.0 - step / (2 * args.steps)]), img_ids=img_ids, txt_ids=torch.zeros(32, 3))
    return {k: v.to(device) for k, v in tensors.items()} | {"return_dict": False}


def llama_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def llama_inputs(step: int, args: argparse.Namespace, device: torch.device, seed: int) -> dict[str, Any]:
    """Prompts that change a few tokens per step (the activations drift)."""
    ids = torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(seed))
    ids[:, -(1 + step % 4):] = step
    return {"input_ids": ids.to(device)}


def output_of(engine: Any, model_kind: str) -> Callable[[dict[str, Any]], torch.Tensor]:
    if model_kind == "flux":
        return lambda inputs: engine(**inputs)[0]
    return lambda inputs: engine(**inputs).logits


def run_steps(engine: Any, handle: chds.TensorParallelHandle, inputs: list[dict[str, Any]],
              forward: Callable[[dict[str, Any]], torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    outs, wire = [], []
    for x in inputs:
        before = handle.stats().get("wire_bytes", 0)
        outs.append(forward(x))
        handle.next_step()
        wire.append(handle.stats().get("wire_bytes", 0) - before)
    return outs, wire


def run(args: argparse.Namespace) -> None:
    from deepspeed.accelerator import get_accelerator

    chds.init_distributed()
    accel = get_accelerator()
    if accel.device_name() == "cpu":  # the deepspeed launcher leaves OMP_NUM_THREADS unset: one thread per core each
        set_rank_threads(announce=True)
    if accel.device_name() != "cpu":
        accel.set_device(args.local_rank)
    device = torch.device(accel.current_device_name())
    model = flux_model() if args.model == "flux" else llama_model()
    policy = chds.flux_tp_policy() if args.model == "flux" else None
    engine = chds.init_inference(model, args.deepspeed_config, tp_policy=policy)
    handle: chds.TensorParallelHandle = engine.compact_hooks
    tp_rank_group = dist.get_rank() // chds.tensor_parallel_summary(handle)["tp_size"]
    make = flux_inputs if args.model == "flux" else llama_inputs
    inputs = [make(step, args, device, seed=7 + tp_rank_group) for step in range(args.steps)]
    forward = output_of(engine, args.model)

    with torch.no_grad():
        handle.remove()  # the uncompressed run first: a PassthroughHook on the same sharded model
        exact = chds.attach_tensor_parallel(engine, ch.PassthroughHook())
        refs, _ = run_steps(engine, exact, inputs, forward)
        exact.remove()
        handle = chds.attach_tensor_parallel(engine, handle.hook, config=handle.config)
        outs, wire = run_steps(engine, handle, inputs, forward)
    max_abs = max((o - r).abs().max().item() for o, r in zip(outs, refs))
    max_rel = max((torch.linalg.vector_norm((o - r).float()) / torch.linalg.vector_norm(r.float())).item()
                  for o, r in zip(outs, refs))
    summary(args, handle, device, wire, max_abs, max_rel)


def all_ranks(values: list[float], device: torch.device, op: Any = dist.ReduceOp.SUM) -> list[float]:
    """Sum (or max) a few numbers over all ranks (on ``device``: nccl takes only GPU tensors)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def summary(args: argparse.Namespace, handle: chds.TensorParallelHandle, device: torch.device,
            wire_per_step: list[int], max_abs: float, max_rel: float) -> None:
    stats, info, cfg = handle.stats(), chds.tensor_parallel_summary(handle), handle.config
    raw, wire = all_ranks([stats.get("raw_bytes", 0), stats.get("wire_bytes", 0)], device)
    max_abs, max_rel = all_ranks([max_abs, max_rel], device, dist.ReduceOp.MAX)
    raw_step = stats.get("raw_bytes", 0) / max(len(wire_per_step), 1)
    if dist.get_rank() != 0:
        return
    compressor = cfg.compressor if isinstance(cfg.compressor, str) else cfg.compressor.get("name")
    mb = 1 / 2 ** 20
    sharding = "explicit flux_tp_policy" if args.model == "flux" else "AutoTP"
    print("\ncompact-hooks x DeepSpeed tensor parallel")
    print(f"  ranks              {info['world_size']} ({dist.get_backend()}, {device.type})")
    print(f"  TP groups          {info['tp_groups']} x {info['tp_size']} ranks")
    print(f"  model              {args.model} ({sharding}), {info['sites']} row-parallel all-reduce sites, "
          f"{args.tokens} tokens")
    print(f"  hook               {type(handle.hook).__name__}: compressor {compressor}, residual {cfg.residual}, "
          f"warm-up {cfg.warmup_steps} step(s), collectives {', '.join(cfg.collectives)}")
    print(f"  steps              {args.steps}")
    print(f"  raw bytes          {raw * mb:9.3f} MiB  (all ranks, all steps)")
    print(f"  wire bytes         {wire * mb:9.3f} MiB  ratio {raw / wire if wire else float('nan'):.2f}x")
    last = wire_per_step[-1]
    print(f"  rank 0 per step    raw {raw_step * mb:.3f} MiB; wire first {wire_per_step[0] * mb:.3f} MiB (warm-up), "
          f"then {last * mb:.3f} MiB ({raw_step / last if last else float('nan'):.1f}x)")
    print(f"  max error vs uncompressed (PassthroughHook, same inputs): "
          f"abs {max_abs:.3e}, relative L2 {max_rel:.3e}\n")


if __name__ == "__main__":
    run(parse_args())
    dist.barrier()
    dist.destroy_process_group()
