"""Process groups and DeepSpeed's distributed start-up for the DeepSpeed integration.

On CPU call :func:`disable_shm_allreduce` before ``deepspeed.init_distributed`` (or use
:func:`init_distributed`, which does): DeepSpeed's shared-memory all-reduce JIT-compiles for a minute
and ignores the process group.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import deepspeed
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def disable_shm_allreduce() -> None:
    """Stop DeepSpeed from building its shared-memory all-reduce op (call before init_distributed).

    On CPU that op JIT-compiles for about a minute on first use, sums over the whole world whatever
    process group it is given, and crashes when the ranks are not on one host. Without it
    ``inference_all_reduce`` falls back to ``torch.distributed.all_reduce`` on the right group.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def on_cpu_accelerator() -> bool:
    """Whether DeepSpeed runs on its CPU accelerator (gloo)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed(dist_backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed`` with the shared-memory op disabled on CPU (idempotent)."""
    if dist.is_initialized():
        return
    if on_cpu_accelerator():
        disable_shm_allreduce()
    if dist_backend is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(dist_backend=dist_backend)


def consecutive_groups(size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Split the world into groups of ``size`` consecutive ranks; return ``(my_group, my_cross_group)``.

    ``my_group`` holds ranks ``[k*size, (k+1)*size)`` (a tensor- or sequence-parallel group);
    ``my_cross_group`` holds the ranks with the same index in every group (data parallel). Every rank
    must call this in the same order: it creates all groups collectively.
    """
    world = dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(f"a group size of {size} does not divide the world size {world}; "
                         f"choose a size that divides {world}")
    rank = dist.get_rank()
    mine = cross = None
    for k in range(world // size):
        group = dist.new_group(list(range(k * size, (k + 1) * size)))
        if rank // size == k:
            mine = group
    for j in range(size):
        group = dist.new_group(list(range(j, world, size)))
        if rank % size == j:
            cross = group
    return mine, cross


@dataclass(frozen=True)
class GroupMPU:
    """The model-parallel unit DeepSpeed's InferenceEngine accepts as ``tensor_parallel.mpu``.

    ``data_group`` (ranks with the same index in every model-parallel group) is optional: DeepSpeed
    inference reads only the model-parallel group and rank.
    """

    model_group: dist.ProcessGroup
    data_group: Optional[dist.ProcessGroup] = None

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.model_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.model_group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.model_group)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        if self.data_group is None:
            raise RuntimeError("this GroupMPU was built without a data-parallel group (see consecutive_groups)")
        return self.data_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.get_data_parallel_group())

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_data_parallel_group())
