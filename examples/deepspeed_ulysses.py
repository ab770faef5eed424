"""Ulysses sequence parallel with compressed all-to-alls, under the DeepSpeed launcher.

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 examples/deepspeed_ulysses.py \
        --deepspeed_config examples/configs/ulysses_int2.json

The same command without ``DS_ACCELERATOR=cpu`` runs on GPUs (nccl). A stack of attention layers
(:class:`CompactDistributedAttention`, DeepSpeed's Ulysses layout) processes a slowly drifting
sequence for ``--steps`` "denoising steps", once with the hook the config's ``"compact_hooks"``
block describes and once with a PassthroughHook on the same inputs; rank 0 prints a summary.
``"sequence_parallel_size"`` in the config (default: all ranks) sets the group size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from compact_hooks.integrations import deepspeed as chds
from torch import nn

import compact_hooks as ch
from compact_hooks.distributed import set_rank_threads

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "ulysses_int2.json"


def parse_args() -> argparse.Namespace:
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512, help="global sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    args.deepspeed_config = args.deepspeed_config or str(DEFAULT_CONFIG)
    return args


class AttentionBlock(nn.Module):
    """Pre-norm self-attention whose attention core is Ulysses through ``hook``."""

    def __init__(self, hidden: int, heads: int, group: dist.ProcessGroup, key: str, hook: ch.CommHook) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn = chds.CompactDistributedAttention(self.attend, group, 2, 1, key=key, hook=hook)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full-sequence attention over the heads this rank holds: ``[b, s, h, d]`` in and out."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, -1).unbind(2)
        return x + self.out(self.attn(q, k, v, 0).reshape(b, s, -1))


def build_model(args: argparse.Namespace, group: dist.ProcessGroup, hook: ch.CommHook,
                device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)  # same weights on every rank and for both hooks
    hidden = args.heads * args.head_dim
    blocks = [AttentionBlock(hidden, args.heads, group, f"layers.{i}.attn", hook) for i in range(args.layers)]
    return nn.Sequential(*blocks).to(device=device, dtype=dtype).eval()


def step_input(step: int, args: argparse.Namespace, group: dist.ProcessGroup, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """This rank's slice of a sequence that drifts slowly from step to step (like denoising latents)."""
    g = torch.Generator().manual_seed(1234)
    shape = (1, args.tokens, args.heads * args.head_dim)
    base, drift = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(99 + step))
    full = base + 0.05 * step * drift + 0.01 * noise
    return chds.split_sequence(full, group, dim=1).to(device=device, dtype=dtype)


def run(args: argparse.Namespace) -> None:
    from deepspeed.accelerator import get_accelerator

    chds.init_distributed()
    accel = get_accelerator()
    if accel.device_name() == "cpu":  # the deepspeed launcher leaves OMP_NUM_THREADS unset: one thread per core each
        set_rank_threads(announce=True)
    if accel.device_name() != "cpu":
        accel.set_device(args.local_rank)
    device, dtype = torch.device(accel.current_device_name()), getattr(torch, args.dtype)
    ds_config = chds.ds_config_without_block(args.deepspeed_config)
    cfg = chds.compact_config(args.deepspeed_config)
    sp = int(ds_config.get("sequence_parallel_size", dist.get_world_size()))
    group, _ = chds.consecutive_groups(sp)

    hook = ch.build_hook(cfg)
    compact = build_model(args, group, hook, device, dtype)
    exact = build_model(args, group, ch.PassthroughHook(), device, dtype)
    max_abs, max_rel, per_step = 0.0, 0.0, []
    with torch.no_grad():
        for step in range(args.steps):
            x = step_input(step, args, group, device, dtype)
            before = hook.stats().get("wire_bytes", 0)
            out, ref = compact(x), exact(x)
            hook.next_step()
            per_step.append(hook.stats().get("wire_bytes", 0) - before)
            max_abs = max(max_abs, (out - ref).abs().max().item())
            max_rel = max(max_rel, (torch.linalg.vector_norm((out - ref).float())
                                    / torch.linalg.vector_norm(ref.float())).item())
    summary(args, cfg, hook, sp, device, per_step, max_abs, max_rel)


def all_ranks(values: list[float], device: torch.device, op: Any = dist.ReduceOp.SUM) -> list[float]:
    """Sum (or max) a few numbers over all ranks (on ``device``: nccl takes only GPU tensors)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def summary(args: argparse.Namespace, cfg: ch.CompactConfig, hook: ch.CommHook, sp: int, device: torch.device,
            per_step: list[int], max_abs: float, max_rel: float) -> None:
    stats = hook.stats()
    raw, wire = all_ranks([stats.get("raw_bytes", 0), stats.get("wire_bytes", 0)], device)
    max_abs, max_rel = all_ranks([max_abs, max_rel], device, dist.ReduceOp.MAX)
    raw_step = stats.get("raw_bytes", 0) / max(len(per_step), 1)
    if dist.get_rank() != 0:
        return
    world = dist.get_world_size()
    compressor = cfg.compressor if isinstance(cfg.compressor, str) else cfg.compressor.get("name")
    mb = 1 / 2 ** 20
    print("\ncompact-hooks x DeepSpeed Ulysses (sequence parallel)")
    print(f"  ranks              {world} ({dist.get_backend()}, {device.type})")
    print(f"  sequence groups    {world // sp} x {sp} ranks")
    print(f"  model              {args.layers} attention layers, {args.heads} heads x {args.head_dim}, "
          f"{args.tokens} tokens ({args.tokens // sp} per rank), {args.dtype}")
    print(f"  hook               {type(hook).__name__}: compressor {compressor}, residual {cfg.residual}, "
          f"warm-up {cfg.warmup_steps} step(s), collectives {', '.join(cfg.collectives)}")
    print(f"  steps              {args.steps} ({len(stats.get('per_key', {}))} call sites: q, k, v, o per layer)")
    print(f"  raw bytes          {raw * mb:9.3f} MiB  (all ranks, all steps)")
    print(f"  wire bytes         {wire * mb:9.3f} MiB  ratio {raw / wire if wire else float('nan'):.2f}x")
    print(f"  rank 0 per step    raw {raw_step * mb:.3f} MiB; wire first {per_step[0] * mb:.3f} MiB (warm-up), "
          f"then {per_step[-1] * mb:.3f} MiB ({raw_step / per_step[-1] if per_step[-1] else float('nan'):.1f}x)")
    print(f"  max error vs uncompressed (PassthroughHook, same inputs): "
          f"abs {max_abs:.3e}, relative L2 {max_rel:.3e}\n")


if __name__ == "__main__":
    run(parse_args())
    dist.barrier()
    dist.destroy_process_group()
