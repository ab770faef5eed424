"""Rank functions of the yunchang tests: yunchang's own attention layers, with and without the hook."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.hooks import CompactHook, PassthroughHook
from compact_hooks.topology import group_ranks

B, S, H, D = 2, 32, 4, 16
DRIFT = 0.05  # per-step change of q/k/v relative to their size (adjacent denoising steps)


class Recorder(CommHook):
    def __init__(self, inner: CommHook) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        self.calls.append((call.op, str(call.key), group_ranks(call.group)))
        return self.inner(call)

    def next_step(self) -> None:
        self.inner.next_step()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


def _inputs(step: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    drift = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    return tuple(x + DRIFT * step * d for x, d in zip(base, drift))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = x.shape[1] // world
    return x[:, rank * n:(rank + 1) * n].contiguous()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref))


def yunchang_worker(rank: int, world: int, layouts: list[tuple[int, int]]) -> dict[str, Any]:
    """Per (ulysses, ring) layout and layer: yunchang's output with and without the hook, keys, groups,
    and an int2 error-feedback run over drifting inputs."""
    torch.set_num_threads(1)
    import yunchang
    from compact_hooks.integrations.yunchang import YunchangHooks, cpu_flash_attention, hook_yunchang
    from yunchang import LongContextAttention, UlyssesAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    out: dict[str, Any] = {"version": yunchang.__version__}
    with cpu_flash_attention() as registered:
        out["registered_cpu_kernel"] = registered
        for u, r in layouts:
            set_seq_parallel_pg(u, r, rank, world)
            uly, ring = group_ranks(PROCESS_GROUP.ULYSSES_PG), group_ranks(PROCESS_GROUP.RING_PG)
            layers = {
                "long_basic_pytorch": lambda: LongContextAttention(ring_impl_type="basic_pytorch",
                                                                   attn_type=AttnType.TORCH_FLASH),
                "long_basic": lambda: LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_FLASH),
            }
            if r == 1:
                layers["ulysses"] = lambda: UlyssesAttention(PROCESS_GROUP.ULYSSES_PG, attn_type=AttnType.TORCH_FLASH)
            q, k, v = _inputs()
            ql, kl, vl = (_shard(x, rank, world) for x in (q, k, v))
            ref = _shard(_reference(q, k, v), rank, world)
            for name, make in layers.items():
                attn = make()
                with torch.no_grad():
                    own = attn(ql, kl, vl)
                    rec = Recorder(PassthroughHook())
                    with YunchangHooks(rec) as hooks:
                        hooks.attach(attn, "blocks.0.attn")
                        hooked = attn(ql, kl, vl)
                    after = attn(ql, kl, vl)  # removed: yunchang's own path again
                calls = sorted({(op, key.split(":", 1)[1].split(".")[0], ranks == uly, ranks == ring)
                                for op, key, ranks in rec.calls})
                out[f"{u}x{r}:{name}"] = {
                    "bitwise": bool(torch.equal(own, hooked)), "after": bool(torch.equal(own, after)),
                    "vs_full": float((own - ref).abs().max()), "calls": [list(c) for c in calls],
                    "n_calls": len(rec.calls), "unrouted": hooks.unrouted,
                }
            out[f"{u}x{r}:ef"] = _ef_run(rank, world, hook_yunchang)
    return out


def _ef_run(rank: int, world: int, hook_yunchang: Any, steps: int = 6) -> dict[str, Any]:
    """int2 with error feedback over drifting inputs: rel-L2 against yunchang's exact output per step."""
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    attn = LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_FLASH)
    hook = CompactHook({"compressor": "int2", "residual": "ef", "warmup_steps": 1})
    errors = []
    for step in range(steps):
        ql, kl, vl = (_shard(x, rank, world) for x in _inputs(step))
        with torch.no_grad():
            exact = attn(ql, kl, vl)
            with hook_yunchang(hook, attn, "blocks.0.attn"):
                y = attn(ql, kl, vl)
        hook.next_step()
        err = torch.tensor([_rel(y, exact)])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors.append(float(err))
    stats = hook.stats()
    return {"errors": errors, "ratio": stats["compression_ratio"], "keys": sorted(stats["per_key"])}
