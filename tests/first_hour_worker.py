"""A quick-start script as a user writes it: ``compact_hooks.init_distributed()`` under whatever launcher
started it (mpirun, Slurm's variables, torchrun, deepspeed), then a compressed all_gather over a few
steps. Rank 0 prints ``@@RESULT {json}``: world size, every rank's launcher view, CPU threads, the
all_gather's error against the exact result and the byte counts."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

import compact_hooks as ch

MARK = "@@RESULT "


def main() -> None:
    world = ch.init_distributed()
    rank, size = dist.get_rank(world), dist.get_world_size(world)
    hook = ch.build_hook({"compressor": "int2", "residual": "ef"})
    errors = []
    base = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        mine = base + 0.05 * step + 0.01 * rank  # slowly drifting, like adjacent denoising steps
        out = hook(ch.CollectiveCall("all_gather", mine, world, key="blocks.0.attn:k"))
        exact = torch.cat([base + 0.05 * step + 0.01 * r for r in range(size)])
        errors.append(float((out - exact).norm() / exact.norm()))
        hook.next_step()
    me = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "threads": torch.get_num_threads(),
          "omp": os.environ.get("OMP_NUM_THREADS")}
    every: list = [None] * size
    dist.all_gather_object(every, me, group=world)
    stats = hook.stats()
    if rank == 0:
        print(MARK + json.dumps({"world_size": size, "ranks": every, "rel_errors": errors,
                                 "raw_bytes": stats["raw_bytes"], "wire_bytes": stats["wire_bytes"]}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
