"""DeepSpeed integration: Ulysses sequence parallel and AutoTP tensor parallel through a CommHook.

* :class:`CompactDistributedAttention` is ``deepspeed.sequence.layer.DistributedAttention`` with its
  all-to-alls routed through a hook: Q, K and V in one (``"<key>:qkv"``), the output back (``"<key>:o"``).
* :func:`attach_tensor_parallel` routes the all-reduce of every ``LinearAllreduce`` (what AutoTP puts
  after each row-parallel linear) through a hook, on the module's own process group.
* :func:`shard_tensor_parallel` with :func:`flux_tp_policy` shards a diffusion transformer with
  DeepSpeed's own ``LinearLayer`` / ``LinearAllreduce`` classes where AutoTP's parser cannot.
* :func:`init_inference` is a drop-in for ``deepspeed.init_inference`` that reads the
  ``"compact_hooks"`` block of the DeepSpeed config and attaches the hook it describes.

The package, by module: ``ulysses`` (sequence parallel), ``autotp`` (hooking ``LinearAllreduce``),
``policies`` (explicit tensor-parallel plans), ``inference`` (``init_inference`` and the config block),
``groups`` (process groups, distributed start-up).

On CPU call :func:`disable_shm_allreduce` before ``deepspeed.init_distributed``: DeepSpeed's
shared-memory all-reduce JIT-compiles for a minute and ignores the process group.
"""

from __future__ import annotations

try:
    import deepspeed  # noqa: F401
    from deepspeed.module_inject import layers as _ds_layers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without deepspeed
    raise ImportError(
        "compact_hooks.integrations.deepspeed needs DeepSpeed; install it with "
        "`pip install 'compact-hooks[deepspeed]'`"
    ) from exc

from .autotp import (
    TensorParallelHandle,
    attach_tensor_parallel,
    row_parallel_forward,
    tensor_parallel_summary,
)
from .groups import GroupMPU, consecutive_groups, disable_shm_allreduce, init_distributed, on_cpu_accelerator
from .inference import compact_config, ds_config_without_block, init_inference
from .policies import TPPlan, flux_tp_policy, shard_tensor_parallel
from .ulysses import A2ALayout, CompactDistributedAttention, gather_sequence, hooked_all_to_all, split_sequence, ulysses_layout

__all__ = [
    "A2ALayout",
    "CompactDistributedAttention",
    "GroupMPU",
    "TPPlan",
    "TensorParallelHandle",
    "attach_tensor_parallel",
    "compact_config",
    "consecutive_groups",
    "disable_shm_allreduce",
    "ds_config_without_block",
    "flux_tp_policy",
    "gather_sequence",
    "hooked_all_to_all",
    "init_distributed",
    "init_inference",
    "on_cpu_accelerator",
    "row_parallel_forward",
    "shard_tensor_parallel",
    "split_sequence",
    "tensor_parallel_summary",
    "ulysses_layout",
]
