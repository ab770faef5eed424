"""``init_inference``: ``deepspeed.init_inference`` that reads the ``"compact_hooks"`` block of the config.

DeepSpeed gets its config without the block; the hook the block describes is attached to every
``LinearAllreduce`` of the engine (:func:`~.autotp.attach_tensor_parallel`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import deepspeed
import torch.distributed as dist
from torch import nn

import compact_hooks as ch
from compact_hooks.config import BLOCK, CompactConfig, check_block_name, read_json

from .autotp import attach_tensor_parallel
from .groups import Group, GroupMPU, consecutive_groups, init_distributed
from .policies import TPPolicy, shard_tensor_parallel

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], None]


def _as_dict(config: ConfigSource) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        return read_json(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a path to a DeepSpeed JSON file or a dict; got {type(config).__name__}")


def ds_config_without_block(config: ConfigSource) -> dict[str, Any]:
    """The DeepSpeed config (path or dict) without its ``"compact_hooks"`` block, for DeepSpeed itself
    (``init_inference`` rejects unknown keys; ``deepspeed.initialize`` configs stay valid too)."""
    return ch.strip_config(_as_dict(config))


def compact_config(config: ConfigSource) -> CompactConfig:
    """The validated ``"compact_hooks"`` block of a DeepSpeed config. A config without the block
    gets ``enabled: false`` (plain collectives), as DeepSpeed treats a missing feature block; a
    misspelt block (``"compact_hook"``) raises :class:`~compact_hooks.ConfigError` naming both."""
    data = _as_dict(config)
    check_block_name(data)
    return ch.load_config(data) if BLOCK in data else CompactConfig(enabled=False)


def _merge_kwargs(ds_config: dict[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(ds_config)
    for key, value in kwargs.items():
        if key in merged and merged[key] != value:
            raise ValueError(f"'{key}' is set both in the config ({merged[key]!r}) and as a keyword "
                             f"argument ({value!r}); set it in one place")
        merged[key] = value
    return merged


def _tp_section(merged: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    key = "tp" if "tp" in merged and "tensor_parallel" not in merged else "tensor_parallel"
    section = merged.get(key) or {}
    if isinstance(section, Mapping):
        section = dict(section)
    else:  # a DeepSpeedTPConfig object
        section = {name: getattr(section, name) for name in type(section).model_fields}
    if "tp_size" not in section and "mp_size" in merged:
        section["tp_size"] = merged.pop("mp_size")
    return key, section


def _group_size_of(tp: Mapping[str, Any]) -> int:
    if tp.get("tp_group") is not None:
        return dist.get_world_size(tp["tp_group"])
    if tp.get("mpu") is not None:
        return dist.get_world_size(tp["mpu"].get_model_parallel_group())
    return int(tp.get("tp_size", 1))


def _tp_group(tp: dict[str, Any], tp_size: int) -> dist.ProcessGroup:
    """The group to shard over: the configured one, or this rank's group of consecutive ranks."""
    if tp.get("tp_group") is not None:
        return tp["tp_group"]
    if tp.get("mpu") is not None:
        return tp["mpu"].get_model_parallel_group()
    if tp_size == dist.get_world_size():
        return dist.group.WORLD
    mine, cross = consecutive_groups(tp_size)
    tp["mpu"] = GroupMPU(mine, cross)
    return mine


def init_inference(model: nn.Module, config: ConfigSource = None, *, hook: Optional[ch.CommHook] = None,
                   tp_policy: Optional[TPPolicy] = None, **kwargs: Any) -> Any:
    """Drop-in for ``deepspeed.init_inference`` that also attaches compact-hooks.

    ``config`` is the DeepSpeed inference config (dict or JSON path) with an optional
    ``"compact_hooks"`` block; DeepSpeed gets it without the block, and ``hook`` (default: built from
    the block with :func:`compact_hooks.build_hook`) is attached to every ``LinearAllreduce``. The
    engine carries the :class:`TensorParallelHandle` as ``engine.compact_hooks``.

    Beyond DeepSpeed: a ``tp_size`` smaller than the world builds groups of consecutive ranks (DeepSpeed
    alone puts only ranks ``0..tp_size-1`` in its group); ``tp_policy`` (e.g. :func:`flux_tp_policy`)
    shards the named blocks here instead of AutoTP's parser, and DeepSpeed then sees ``tp_size=1``.
    """
    cfg = compact_config(config)  # validates the block before DeepSpeed or the network is touched
    merged = _merge_kwargs(ds_config_without_block(config), kwargs)
    section_key, tp = _tp_section(merged)
    tp_size = _group_size_of(tp)
    if tp_size > 1 or tp_policy is not None:
        init_distributed()
    group: Group = None
    if tp_policy is not None:
        if merged.get("replace_with_kernel_inject") or merged.get("kernel_inject"):
            raise ValueError("tp_policy shards with DeepSpeed's AutoTP layers; set replace_with_kernel_inject=false")
        if tp_size > 1:
            group = _tp_group(tp, tp_size)
            shard_tensor_parallel(model, tp_policy, group)
        tp = {k: v for k, v in tp.items() if k not in ("mpu", "tp_group")}
        tp["tp_size"] = 1
    elif tp_size > 1 and (tp_size < dist.get_world_size() or tp.get("mpu") is not None
                          or tp.get("tp_group") is not None):
        # DeepSpeed would group ranks 0..tp_size-1 only, and with an mpu alone it leaves AutoTP's
        # tp_group unset: give it both.
        group = _tp_group(tp, tp_size)
        tp.setdefault("mpu", GroupMPU(group))
        tp["tp_group"] = group
    merged[section_key] = tp
    engine = deepspeed.init_inference(model, config=merged)
    if hook is None:
        handle = attach_tensor_parallel(engine, ch.build_hook(cfg), config=cfg)
    else:
        handle = attach_tensor_parallel(engine, hook)
    handle.tp_group = group if group is not None else handle.tp_group
    engine.compact_hooks = handle
    return engine
