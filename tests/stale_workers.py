"""Rank programs of tests/test_stale_compact.py (stale exchanges, plain and compressed)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.hook import CollectiveCall, CommHook


def value(rank: int, step: int, where: str, shape: tuple[int, ...] = (2, 4)) -> torch.Tensor:
    """A tensor that names its rank, step and group (``"sub"`` or ``"world"``)."""
    return torch.full(shape, 100.0 * rank + step + (0.5 if where == "world" else 0.0))


def exact_gather(ranks: list[int], step: int, where: str) -> torch.Tensor:
    return torch.cat([value(r, step, where) for r in ranks], dim=0)


def shared_key_worker(rank: int, world: int, hook_name: str) -> list[str]:
    """One key ``"k"`` on a sub-group (ranks 0, 1) and on the world, three steps; the problems seen
    (each result against the stale schedule: step 0 exact, later steps the previous step's remote parts
    with the local part fresh)."""
    sub_ranks = [0, 1]
    sub = dist.new_group(sub_ranks)
    hook: CommHook = ch.StaleHook(1, timeout_s=60) if hook_name == "stale" else ch.build_hook(
        {"compressor": "int8", "stale": True, "warmup_compressor": None, "timeout_s": 60})
    problems = []
    for step in range(3):
        for where, group, ranks in (("sub", sub, sub_ranks), ("world", None, list(range(world)))):
            if rank not in ranks:
                continue
            got = hook(CollectiveCall("all_gather", value(rank, step, where), group, key="k"))
            want = exact_gather(ranks, max(step - 1, 0), where)
            me = ranks.index(rank)
            want[2 * me:2 * me + 2] = value(rank, step, where)
            tol = 0.0 if hook_name == "stale" else 0.05  # int8 residuals of a constant step: exact
            if got.shape != want.shape or (got - want).abs().max() > tol:
                problems.append(f"step {step} {where}: got {got[:, 0].tolist()}, want {want[:, 0].tolist()}")
        hook.next_step()
    return problems


def drifting(rank: int, step: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A smooth per-rank activation stream: a fixed pattern that drifts a little each step."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    base = torch.randn(shape, generator=g)
    drift = torch.randn(shape, generator=g)
    return base + 0.1 * step * drift + 0.01 * step * step * drift.flip(-1)


def schedule_worker(rank: int, world: int, op: str) -> dict[str, Any]:
    """A compressed stale hook against a CompactHook fed the same stream one call per step: the stale
    result of step t is the compact result of step t-1 with the local part fresh, a fresh role's is
    the compact result of step t; the bases of every stream are bit-identical on all ranks."""
    cfg = {"compressor": "int2", "warmup_compressor": None, "timeout_s": 60, "collectives": [op]}
    stale = ch.build_hook({**cfg, "stale": True})
    compact = ch.build_hook(cfg)
    shape = (2 * world, 64)
    problems: list[str] = []
    results: list[torch.Tensor] = []
    for step in range(6):
        x = drifting(rank, step, shape)
        got = stale(CollectiveCall(op, x, None, key="x"))
        results.append(compact(CollectiveCall(op, x, None, key="x")))
        fresh = stale(CollectiveCall(op, x, None, key="attn:o"))  # the default fresh role
        if not torch.equal(fresh, compact(CollectiveCall(op, x, None, key="attn:o"))):
            problems.append(f"{op} step {step}: the fresh role's result is not this step's compact result")
        want = results[0] if step == 0 else results[-2].clone()
        if op == "all_reduce":
            if step:
                want = want - drifting(rank, step - 1, shape) + x
        elif op in ("all_gather", "all_to_all"):
            rows = x.shape[0] // world if op == "all_to_all" else x.shape[0]
            mine = x.chunk(world, 0)[rank] if op == "all_to_all" else x
            want[rank * rows:(rank + 1) * rows] = mine
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            problems.append(f"{op} step {step}: max diff {float((got - want).abs().max()):.3g}")
        stale.next_step()
        compact.next_step()
    in_flight = stale.stats()["in_flight"]
    stale.drain()  # the last step's exchange: its receivers' bases advance here
    digests = {k: v for s in stale.sessions() for k, v in s.base_digests().items()}
    return {"problems": problems, "digests": digests, "stats": stale.stats()["per_key"], "in_flight": in_flight}


def overlap_worker(rank: int, world: int, delay_s: float) -> dict[str, Any]:
    """The peer (rank 1) sleeps ``delay_s`` (its compute) before each call of steps 1..3; rank 0's
    calls return without waiting for that step's exchange (the previous step's result is there), so
    rank 0 is ahead of its peer while the exchange is in flight."""
    hook = ch.build_hook({"compressor": "int2", "stale": True, "timeout_s": 60, "warmup_compressor": None})
    shape = (2 * world, 64)
    times: list[tuple[float, float]] = []
    hook(CollectiveCall("all_to_all", drifting(rank, 0, shape), None, key="x"))
    hook.next_step()
    dist.barrier()
    for step in range(1, 4):
        if rank == 1:
            time.sleep(delay_s)
        began = time.time()
        hook(CollectiveCall("all_to_all", drifting(rank, step, shape), None, key="x"))
        times.append((began, time.time()))
        hook.next_step()
    hook.begin_request()  # drains the last exchange
    return {"times": times}


def relay_worker(rank: int, world: int) -> list[str]:
    """Ring attention's relay through the compressed stale hook: at step t every hop h (h = 1..P-1)
    returns rank (r - h)'s block of step t-1 (int8: close to exact), hop 0 the own fresh block."""
    from compact_hooks.integrations.diffusers.attention import ring_blocks

    hook = ch.build_hook({"compressor": "int8", "stale": True, "warmup_compressor": None, "timeout_s": 60})
    shape = (1, 4, 2, 8)
    problems = []
    for step in range(4):
        k, v = drifting(rank, step, shape, seed=1), drifting(rank, step, shape, seed=2)
        for hop, kb, vb in ring_blocks(k, v, hook, None, "attn:k", "attn:v"):
            src, when = (rank - hop) % world, step if hop == 0 or step == 0 else step - 1
            for got, seed in ((kb, 1), (vb, 2)):
                want = drifting(src, when, shape, seed=seed)
                if (got - want).abs().max() > 0.05:
                    problems.append(f"step {step} hop {hop}: not rank {src}'s block of step {when}")
        hook.next_step()
    return problems
