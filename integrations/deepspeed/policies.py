"""Explicit tensor-parallel policies: shard a diffusion transformer with DeepSpeed's AutoTP layers.

:func:`shard_tensor_parallel` replaces the linears a :class:`TPPlan` names by DeepSpeed's
``LinearLayer`` / ``LinearAllreduce`` / ``SubParamLinearAllreduce`` where AutoTP's parser cannot;
:func:`flux_tp_policy` is the plan for diffusers' Flux blocks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch.distributed as dist
from deepspeed.module_inject import layers as ds_layers
from torch import nn


@dataclass(frozen=True)
class TPPlan:
    """Tensor-parallel roles of the linears inside one block class; names are relative to the block.

    * ``column``: split the output features (``LinearLayer``);
    * ``row``: split the input features, all-reduce the output (``LinearAllreduce``);
    * ``packed_row``: row-parallel linears whose input concatenates several column-parallel outputs,
      mapped to the sizes of those parts (ints, or attribute paths on the block such as
      ``"attn.inner_dim"``); each part is split separately (``SubParamLinearAllreduce``);
    * ``divide``: integer attributes divided by the group size (``"attn.heads"``).

    Linears not named stay replicated (AdaLayerNorm modulation, embedders).
    """

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    packed_row: Mapping[str, tuple[Union[int, str], ...]] = field(default_factory=dict)
    divide: tuple[str, ...] = ()


TPPolicy = Mapping[type, Union[TPPlan, Sequence[str], str]]


def _as_plan(block: nn.Module, spec: Union[TPPlan, Sequence[str], str]) -> TPPlan:
    """A DeepSpeed-style spec (names of the row-parallel linears; every other linear of the block is
    column-parallel) as a :class:`TPPlan`. Names are full paths inside the block."""
    if isinstance(spec, TPPlan):
        return spec
    rows = (spec,) if isinstance(spec, str) else tuple(spec)
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    return TPPlan(column=tuple(n for n in linears if n not in rows), row=rows)


def _resolve_size(block: nn.Module, size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    obj: Any = block
    for part in size.split("."):
        obj = getattr(obj, part)
    return int(obj)


def _linear(block: nn.Module, name: str, block_name: str) -> nn.Linear:
    try:
        module = block.get_submodule(name)
    except AttributeError:
        raise ValueError(f"tensor-parallel policy names {name!r}, but {block_name} "
                         f"({type(block).__name__}) has no such submodule") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"tensor-parallel policy names {block_name}.{name}, a {type(module).__name__}; "
                         "only torch.nn.Linear layers can be sharded")
    return module


def _check_split(n: int, size: int, what: str) -> None:
    if n % size:
        raise ValueError(f"{what} has {n} features, not divisible by the tensor-parallel size {size}; "
                         "use a tp_size that divides it")


def _set_submodule(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, module)


def _tp_meta() -> dict[str, Any]:
    """Even splits (grain 1, no head-count heuristics): the divisibility checks already hold."""
    meta_cls = getattr(importlib.import_module("deepspeed.module_inject.tp_shard"), "AutoTPMeta", None)
    return {"tp_meta": meta_cls(tp_grain_size=1)} if meta_cls is not None else {}


def _shard_block(block: nn.Module, block_name: str, plan: TPPlan, group: dist.ProcessGroup) -> list[str]:
    size = dist.get_world_size(group)
    meta = _tp_meta()
    replaced: list[str] = []
    for name in plan.column:
        lin = _linear(block, name, block_name)
        _check_split(lin.out_features, size, f"{block_name}.{name} (column-parallel) output")
        _set_submodule(block, name, ds_layers.LinearLayer(lin, group, name=f"{block_name}.{name}", **meta))
        replaced.append(name)
    for name in plan.row:
        lin = _linear(block, name, block_name)
        _check_split(lin.in_features, size, f"{block_name}.{name} (row-parallel) input")
        _set_submodule(block, name, ds_layers.LinearAllreduce(lin, group, name=f"{block_name}.{name}", **meta))
        replaced.append(name)
    for name, parts in plan.packed_row.items():
        lin = _linear(block, name, block_name)
        sizes = tuple(_resolve_size(block, p) for p in parts)
        if sum(sizes) != lin.in_features:
            raise ValueError(f"{block_name}.{name}: packed parts {sizes} sum to {sum(sizes)}, but the linear "
                             f"has {lin.in_features} input features")
        for s in sizes:
            _check_split(s, size, f"{block_name}.{name} (packed row-parallel) input part")
        layer = ds_layers.SubParamLinearAllreduce(lin, group, shape=(lin.out_features, sizes), partition_dim=1,
                                                  name=f"{block_name}.{name}", **meta)
        _set_submodule(block, name, layer)
        replaced.append(name)
    for attr in plan.divide:
        parent_name, _, leaf = attr.rpartition(".")
        owner = block.get_submodule(parent_name) if parent_name else block
        value = getattr(owner, leaf)
        _check_split(value, size, f"{block_name}.{attr}")
        setattr(owner, leaf, value // size)
    return [f"{block_name}.{n}" for n in replaced]


def shard_tensor_parallel(model: nn.Module, policy: TPPolicy, group: dist.ProcessGroup) -> list[str]:
    """Shard every block of ``model`` whose class is in ``policy`` over ``group``, in place.

    ``policy`` maps a block class to a :class:`TPPlan` or, DeepSpeed-style, to the names of its
    row-parallel linears (all its other linears become column-parallel). Uses DeepSpeed's
    ``LinearLayer`` / ``LinearAllreduce`` / ``SubParamLinearAllreduce``, so :func:`attach_tensor_parallel`
    hooks the result like an AutoTP model. Returns the names of the replaced linears.
    """
    if group is None:
        raise ValueError("shard_tensor_parallel needs an explicit process group (see consecutive_groups)")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(policy))]
    if not blocks:
        raise ValueError(f"the model has no block of the policy's classes "
                         f"({', '.join(c.__name__ for c in policy)}); nothing to shard")
    replaced: list[str] = []
    for block_name, block in blocks:
        spec = next(s for cls, s in policy.items() if isinstance(block, cls))
        replaced += _shard_block(block, block_name, _as_plan(block, spec), group)
    return replaced


def flux_tp_policy() -> dict[type, TPPlan]:
    """The tensor-parallel plan for diffusers' ``FluxTransformer2DModel`` blocks.

    Double blocks: Q/K/V and the added (text) Q/K/V column-parallel over heads, ``attn.to_out.0`` and
    ``attn.to_add_out`` row-parallel; both feed-forwards column (``net.0.proj``) then row (``net.2``).
    Single blocks: Q/K/V and ``proj_mlp`` column, ``proj_out`` row-parallel over its packed
    ``[attention, mlp]`` input. AdaLayerNorm modulation linears, embedders and the output layer stay
    replicated. 4 all-reduces per double block and 1 per single block.
    """
    try:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    except ImportError as exc:
        raise ImportError("flux_tp_policy needs diffusers; install it with "
                          "`pip install 'compact-hooks[diffusers]'`") from exc

    double = TPPlan(
        column=("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "ff.net.0.proj", "ff_context.net.0.proj"),
        row=("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"),
        divide=("attn.heads",),
    )
    single = TPPlan(
        column=("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        packed_row={"proj_out": ("attn.inner_dim", "mlp_hidden_dim")},
        divide=("attn.heads",),
    )
    return {FluxTransformerBlock: double, FluxSingleTransformerBlock: single}
