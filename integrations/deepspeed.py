"""DeepSpeed integration: Ulysses sequence parallel and AutoTP tensor parallel through a CommHook.

* :class:`CompactDistributedAttention` is ``deepspeed.sequence.layer.DistributedAttention`` with its
  four all-to-alls (Q, K, V in; output back) routed through a hook, keys ``"<key>:q|k|v|o"``.
* :func:`attach_tensor_parallel` routes the all-reduce of every ``LinearAllreduce`` (what AutoTP puts
  after each row-parallel linear) through a hook, on the module's own process group.
* :func:`shard_tensor_parallel` with :func:`flux_tp_policy` shards a diffusion transformer with
  DeepSpeed's own ``LinearLayer`` / ``LinearAllreduce`` classes where AutoTP's parser cannot.
* :func:`init_inference` is a drop-in for ``deepspeed.init_inference`` that reads the
  ``"compact_hooks"`` block of the DeepSpeed config and attaches the hook it describes.

On CPU call :func:`disable_shm_allreduce` before ``deepspeed.init_distributed``: DeepSpeed's
shared-memory all-reduce JIT-compiles for a minute and ignores the process group.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

import compact_hooks as ch
from compact_hooks import collectives as C
from compact_hooks.config import BLOCK, CompactConfig, read_json

try:
    import deepspeed
    from deepspeed.module_inject import layers as ds_layers
except ImportError as exc:  # pragma: no cover - exercised only without deepspeed
    raise ImportError(
        "compact_hooks.integrations.deepspeed needs DeepSpeed; install it with "
        "`pip install 'compact-hooks[deepspeed]'`"
    ) from exc

Group = Optional[dist.ProcessGroup]
ConfigSource = Union[str, os.PathLike, Mapping[str, Any], None]

# Row-parallel classes whose forward is matmul -> all-reduce -> bias (SubParamLinearAllreduce is
# not a LinearAllreduce subclass in 0.19.x but has the same forward).
ROW_PARALLEL_CLASSES: tuple[type, ...] = tuple(
    cls for cls in (getattr(ds_layers, "LinearAllreduce", None), getattr(ds_layers, "SubParamLinearAllreduce", None))
    if cls is not None
)
QKV_TAGS = ("q", "k", "v")


# ---------------------------------------------------------------------------------------------
# Environment helpers
# ---------------------------------------------------------------------------------------------


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


def split_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """This rank's slice of the full sequence ``x`` along ``dim``; the group size must divide it."""
    size, rank = C.group_size(group), C.group_rank(group)
    if x.shape[dim] % size:
        raise ValueError(_seq_message(x.shape[dim], size))
    return x.chunk(size, dim=dim)[rank].contiguous()


def gather_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's slice along ``dim`` (plain all-gather)."""
    return C.all_gather(x.contiguous(), group, dim=dim)


def _seq_message(seq_len: int, size: int) -> str:
    padded = -(-seq_len // size) * size
    return (f"the sequence length {seq_len} is not divisible by the {size} ranks of the sequence-parallel "
            f"group; every rank must hold seq_len / {size} tokens: pad the sequence to {padded} "
            f"(or use a group size that divides {seq_len})")


# ---------------------------------------------------------------------------------------------
# Ulysses (sequence parallel)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class A2ALayout:
    """One Ulysses all-to-all: split ``scatter_dim`` over the ranks, concatenate along ``gather_dim``.

    ``pack`` moves the P chunks of ``scatter_dim`` to a contiguous dim 0 (chunk j goes to rank j);
    ``unpack`` puts the received dim 0 (chunk j from rank j) in front of ``gather_dim`` and merges
    them. This is DeepSpeed's ``single_all_to_all`` layout for 4-D ``[b, s, h, d]`` / ``[s, b, h, d]``.
    """

    scatter_dim: int
    gather_dim: int

    def pack(self, x: torch.Tensor, size: int) -> torch.Tensor:
        d = self.scatter_dim
        split = x.reshape(*x.shape[:d], size, x.shape[d] // size, *x.shape[d + 1:])
        return split.movedim(d, 0).contiguous()

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        d = self.gather_dim
        moved = y.movedim(0, d)
        return moved.reshape(*moved.shape[:d], moved.shape[d] * moved.shape[d + 1], *moved.shape[d + 2:]).contiguous()

    def reverse(self) -> "A2ALayout":
        return A2ALayout(self.gather_dim, self.scatter_dim)


def ulysses_layout(scatter_idx: int, batch_dim_idx: int) -> A2ALayout:
    """The layout DeepSpeed uses for a given ``scatter_idx`` (>= 2: scatter heads, gather sequence;
    < 2: scatter sequence, gather heads) and ``batch_dim_idx`` (0: ``[b, s, h, d]``, 1: ``[s, b, h, d]``)."""
    if batch_dim_idx not in (0, 1):
        raise ValueError(f"batch_dim_idx must be 0 ([b, s, h, d]) or 1 ([s, b, h, d]); got {batch_dim_idx}")
    seq_dim = 1 if batch_dim_idx == 0 else 0
    return A2ALayout(2, seq_dim) if scatter_idx >= 2 else A2ALayout(seq_dim, 2)


class _HookedAllToAll(torch.autograd.Function):
    """Forward: the all-to-all through the hook. Backward: the reverse plain all-to-all (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hook: ch.CommHook, key: str, group: Group,
                layout: A2ALayout) -> torch.Tensor:
        ctx.group, ctx.layout = group, layout
        size = C.group_size(group)
        received = hook(ch.CollectiveCall("all_to_all", layout.pack(x, size), group, key=key))
        return layout.unpack(received)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None, None]:
        back = ctx.layout.reverse()
        received = C.all_to_all(back.pack(grad, C.group_size(ctx.group)), ctx.group)
        return back.unpack(received), None, None, None, None


def hooked_all_to_all(x: torch.Tensor, hook: ch.CommHook, key: str, group: Group,
                      layout: A2ALayout) -> torch.Tensor:
    """One Ulysses all-to-all of ``x`` through ``hook`` (differentiable, straight-through)."""
    return _HookedAllToAll.apply(x, hook, key, group, layout)


class CompactDistributedAttention(nn.Module):
    """``deepspeed.sequence.layer.DistributedAttention`` whose all-to-alls go through a CommHook.

    Same constructor and forward as DeepSpeed's, plus ``key`` (the layer's name, e.g.
    ``"transformer_blocks.3.attn"``; the four exchanges use ``key:q``, ``key:k``, ``key:v``,
    ``key:o``) and ``hook`` (default: :class:`compact_hooks.PassthroughHook`, which equals DeepSpeed
    exactly). The backward pass exchanges gradients with plain all-to-alls.

    Unlike DeepSpeed this checks its inputs: head counts must be divisible by the group size, and on
    the first forward the ranks compare their local sequence lengths (one tiny all-gather), so a
    sequence the group does not divide raises instead of failing inside the collective.
    ``check_sequence_lengths=False`` skips that exchange.
    """

    def __init__(self, local_attention: nn.Module, sequence_process_group: Group, scatter_idx: int = 2,
                 gather_idx: int = 0, sp_stream: Any = None, num_kv_heads: Optional[int] = None, *,
                 key: str, hook: Optional[ch.CommHook] = None, check_sequence_lengths: bool = True) -> None:
        super().__init__()
        if sp_stream is not None:
            raise ValueError("CompactDistributedAttention does not overlap communication; pass sp_stream=None")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty layer name such as 'blocks.0.attn'; got {key!r}")
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.num_kv_heads = num_kv_heads
        self.key = key
        self.hook = hook if hook is not None else ch.PassthroughHook()
        self.check_sequence_lengths = check_sequence_lengths
        self._lengths_checked = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_dim_idx: int,
                rotary_pos_emb: Optional[Sequence[torch.Tensor]] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        layout_in = ulysses_layout(self.scatter_idx, batch_dim_idx)
        size = C.group_size(self.spg)
        self._check_inputs((query, key, value), layout_in, size)
        q, k, v = (hooked_all_to_all(t, self.hook, f"{self.key}:{tag}", self.spg, layout_in)
                   for t, tag in zip((query, key, value), QKV_TAGS))
        if rotary_pos_emb is not None:
            q, k = _apply_rotary(q, k, rotary_pos_emb)
        context = self.local_attn(q, k, v, *args, **kwargs)
        layout_out = ulysses_layout(self.gather_idx, batch_dim_idx)
        _check_divisible(context, layout_out.scatter_dim, size, f"{self.key}:o")
        return hooked_all_to_all(context, self.hook, f"{self.key}:o", self.spg, layout_out)

    def _check_inputs(self, tensors: Sequence[torch.Tensor], layout: A2ALayout, size: int) -> None:
        for t, tag in zip(tensors, QKV_TAGS):
            if t.dim() != 4:
                raise ValueError(f"{self.key}:{tag}: Ulysses takes 4-D [b, s, h, d] or [s, b, h, d] tensors; "
                                 f"got shape {tuple(t.shape)}")
            _check_divisible(t, layout.scatter_dim, size, f"{self.key}:{tag}")
        if self.num_kv_heads is not None and self.num_kv_heads % size:
            raise ValueError(f"{self.key}: num_kv_heads={self.num_kv_heads} is not divisible by the {size} "
                             "sequence-parallel ranks; uneven head splits are not supported here")
        if self.check_sequence_lengths and not self._lengths_checked and size > 1:
            _check_equal_lengths(tensors[0], layout.gather_dim, self.spg, self.key)
            self._lengths_checked = True


def _check_divisible(t: torch.Tensor, dim: int, size: int, where: str) -> None:
    if t.shape[dim] % size == 0:
        return
    if dim == 2:
        raise ValueError(f"{where}: {t.shape[2]} attention heads are not divisible by the {size} "
                         f"sequence-parallel ranks; use a group size that divides {t.shape[2]}")
    raise ValueError(f"{where}: " + _seq_message(t.shape[dim], size))


def _check_equal_lengths(t: torch.Tensor, seq_dim: int, group: Group, key: str) -> None:
    """All ranks must hold the same number of tokens (one int64 all-gather, once per layer)."""
    mine = torch.tensor([t.shape[seq_dim]], dtype=torch.int64, device=t.device)
    lengths = [int(n) for n in C.all_gather(mine, group).tolist()]
    if len(set(lengths)) > 1:
        raise ValueError(f"{key}: the ranks hold {lengths} tokens; " + _seq_message(sum(lengths), len(lengths)))


def _apply_rotary(q: torch.Tensor, k: torch.Tensor,
                  rotary_pos_emb: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's rotary embedding after the Q/K all-to-alls (same permutes as DistributedAttention)."""
    from deepspeed.sequence.layer import apply_rotary_pos_emb

    cos, sin = rotary_pos_emb[0].permute(1, 0, 2, 3), rotary_pos_emb[1].permute(1, 0, 2, 3)
    return apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)


# ---------------------------------------------------------------------------------------------
# Tensor parallel: hooking LinearAllreduce
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Explicit tensor-parallel policies (diffusion transformers)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Config and init_inference
# ---------------------------------------------------------------------------------------------


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
    gets ``enabled: false`` (plain collectives), as DeepSpeed treats a missing feature block."""
    data = _as_dict(config)
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


def tensor_parallel_summary(handle: TensorParallelHandle) -> dict[str, Any]:
    """Sizes for a printout: ranks, TP size, number of TP groups, hooked sites."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = dist.get_world_size(handle.tp_group) if handle.tp_group is not None else 1
    return {"world_size": world, "tp_size": tp, "tp_groups": world // tp if tp else 1,
            "sites": len(handle.modules), "hook": type(handle.hook).__name__}


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
