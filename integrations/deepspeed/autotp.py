"""AutoTP tensor parallel: the all-reduce of every ``LinearAllreduce`` through a CommHook.

:func:`attach_tensor_parallel` replaces the forward of each row-parallel layer DeepSpeed's AutoTP
(or :func:`~.policies.shard_tensor_parallel`) put in the model by :func:`row_parallel_forward`, whose
all-reduce is ``CollectiveCall("all_reduce", partial, module.mp_group, key=<module name>)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.module_inject import layers as ds_layers
from torch import nn

import compact_hooks as ch
from compact_hooks.config import CompactConfig

from .groups import Group

# Row-parallel classes whose forward is matmul -> all-reduce -> bias (SubParamLinearAllreduce is
# not a LinearAllreduce subclass in 0.19.x but has the same forward).
ROW_PARALLEL_CLASSES: tuple[type, ...] = tuple(
    cls for cls in (getattr(ds_layers, "LinearAllreduce", None), getattr(ds_layers, "SubParamLinearAllreduce", None))
    if cls is not None
)


class _HookedAllReduce(torch.autograd.Function):
    """Forward: the sum over ``group`` through the hook. Backward: identity, as DeepSpeed's RowParallel."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hook: ch.CommHook, key: str, group: Group) -> torch.Tensor:
        return hook(ch.CollectiveCall("all_reduce", x, group, key=key))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


def _is_parallel(module: nn.Module) -> bool:
    group = getattr(module, "mp_group", None)
    return group is not None and dist.get_world_size(group) > 1


def _row_parallel_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The slice of the input a row-parallel layer multiplies (full inputs are cut as DeepSpeed does)."""
    if isinstance(module, getattr(ds_layers, "LmHeadLinearAllreduce", ())):
        sizes = module._partition_sizes
        if sum(sizes) != x.shape[-1]:
            raise ValueError(f"lm_head was partitioned for {sum(sizes)} input features but got {x.shape[-1]}")
        start = sum(sizes[:module.tp_index])
        return x[..., start:start + sizes[module.tp_index]]
    replicated = getattr(ds_layers, "LinearAllreduceWithReplicatedInput", ())
    if isinstance(module, replicated):
        scatter = ds_layers.ScatterToTensorParallelRegion
        return scatter.apply(module.mp_group, x, module._partition_sizes, module.tp_index)
    return x


def row_parallel_forward(module: nn.Module, hook: ch.CommHook, key: str, x: torch.Tensor) -> torch.Tensor:
    """``LinearAllreduce.forward`` with the all-reduce through ``hook``: matmul, sum over the module's
    own ``mp_group``, then the (replicated) bias, exactly in DeepSpeed's order."""
    if getattr(module, "defer_collectives_to_compiler", False):
        raise RuntimeError(f"{key}: its collectives are deferred to DeepSpeed's AutoTP compile pass, which "
                           "compact-hooks cannot intercept; remove 'autotp' from the DeepCompile passes")
    out = torch.matmul(_row_parallel_input(module, x), module.weight.transpose(-1, -2))
    if _is_parallel(module):
        out = _HookedAllReduce.apply(out, hook, key, module.mp_group)
    if module.bias is not None:
        out = out + module.bias
    return out


def _bind(module: nn.Module, hook: ch.CommHook, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return row_parallel_forward(module, hook, key, x)

    forward.__compact_hooks_key__ = key  # type: ignore[attr-defined]
    return forward


@dataclass
class TensorParallelHandle:
    """What :func:`attach_tensor_parallel` returns: the hook, the hooked modules by name, ``remove()``."""

    hook: ch.CommHook
    modules: dict[str, nn.Module]
    config: Optional[CompactConfig] = None
    tp_group: Group = None
    _saved: dict[str, Optional[Callable[..., Any]]] = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.modules)

    @property
    def attached(self) -> bool:
        return bool(self._saved)

    def remove(self) -> None:
        """Restore every module's original forward (idempotent)."""
        for name, saved in self._saved.items():
            module = self.modules[name]
            module.__dict__.pop("forward", None)
            if saved is not None:
                module.forward = saved
        self._saved.clear()

    def next_step(self) -> None:
        self.hook.next_step()

    def begin_request(self) -> None:
        self.hook.begin_request()

    def stats(self) -> dict[str, Any]:
        return self.hook.stats()


def _root_module(engine_or_module: nn.Module) -> nn.Module:
    engine_cls = getattr(deepspeed, "InferenceEngine", None)
    if engine_cls is not None and isinstance(engine_or_module, engine_cls):
        return engine_or_module.module
    return engine_or_module


def attach_tensor_parallel(engine_or_module: nn.Module, hook: ch.CommHook, *,
                           config: Optional[CompactConfig] = None) -> TensorParallelHandle:
    """Route the all-reduce of every ``LinearAllreduce`` in the model through ``hook``.

    ``engine_or_module`` is what ``deepspeed.init_inference`` returned (or its ``.module``). Each
    module's all-reduce becomes ``CollectiveCall("all_reduce", partial, module.mp_group, key=name)``
    with ``name`` its full module name. ``handle.remove()`` restores the original forwards.
    """
    if not isinstance(hook, ch.CommHook):
        raise TypeError(f"hook must be a compact_hooks.CommHook; got {type(hook).__name__}")
    root = _root_module(engine_or_module)
    handle = TensorParallelHandle(hook=hook, modules={}, config=config)
    for name, module in root.named_modules():
        if not isinstance(module, ROW_PARALLEL_CLASSES):
            continue
        current = module.__dict__.get("forward")
        if current is not None and hasattr(current, "__compact_hooks_key__"):
            raise RuntimeError(f"{name} already has a compact-hooks forward; call remove() on the "
                               "previous handle before attaching again")
        handle.modules[name] = module
        handle._saved[name] = current
        module.forward = _bind(module, hook, name)
        if handle.tp_group is None:
            handle.tp_group = module.mp_group
    return handle


def tensor_parallel_summary(handle: TensorParallelHandle) -> dict[str, Any]:
    """Sizes for a printout: ranks, TP size, number of TP groups, hooked sites."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = dist.get_world_size(handle.tp_group) if handle.tp_group is not None else 1
    return {"world_size": world, "tp_size": tp, "tp_groups": world // tp if tp else 1,
            "sites": len(handle.modules), "hook": type(handle.hook).__name__}
