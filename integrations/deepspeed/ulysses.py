"""Ulysses sequence parallel: DeepSpeed's ``DistributedAttention`` with its all-to-alls through a CommHook.

:class:`CompactDistributedAttention` routes its all-to-alls through a hook: Q, K and V in one
(key ``"<key>:qkv"``; three, ``"<key>:q|k|v"``, when their shapes differ or the hook's rules tell the
roles apart), the output back (``"<key>:o"``); :func:`split_sequence` / :func:`gather_sequence` cut
and join the sequence around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

import compact_hooks as ch
from compact_hooks import collectives as C
from compact_hooks.hooks.fusion import fusable

from .groups import Group

QKV_TAGS = ("q", "k", "v")


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
        return self.chunks_first(x, size).contiguous()

    def chunks_first(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """``pack`` as a view (not contiguous)."""
        d = self.scatter_dim
        split = x.reshape(*x.shape[:d], size, x.shape[d] // size, *x.shape[d + 1:])
        return split.movedim(d, 0)

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


class _HookedQKV(torch.autograd.Function):
    """Forward: Q, K and V (same shape) in one all-to-all through the hook, stacked ``[P, 3, ...]``.
    Backward: each gradient's reverse plain all-to-all (straight-through, as for one tensor)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hook: ch.CommHook, key: str,
                group: Group, layout: A2ALayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.group, ctx.layout = group, layout
        size = C.group_size(group)
        send = torch.stack([layout.chunks_first(t, size) for t in (q, k, v)], dim=1)
        received = hook(ch.CollectiveCall("all_to_all", send, group, key=key))
        out = tuple(layout.unpack(part) for part in received.unbind(1))
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        back, size = ctx.layout.reverse(), C.group_size(ctx.group)
        ins = tuple(None if g is None else back.unpack(C.all_to_all(back.pack(g, size), ctx.group)) for g in grads)
        return (*ins, None, None, None, None)


def hooked_qkv_all_to_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hook: ch.CommHook, key: str,
                          group: Group, layout: A2ALayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V through ``hook``: one all-to-all at ``key:qkv`` when they have one shape and the
    hook's rules treat ``key:q|k|v`` alike (:func:`compact_hooks.hooks.fusion.fusable`), else three."""
    keys = [f"{key}:{tag}" for tag in QKV_TAGS]
    if q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype and fusable(
            hook, keys, f"{key}:qkv", "all_to_all", group):
        return _HookedQKV.apply(q, k, v, hook, f"{key}:qkv", group, layout)
    out = tuple(hooked_all_to_all(t, hook, name, group, layout) for t, name in zip((q, k, v), keys))
    return out[0], out[1], out[2]


class CompactDistributedAttention(nn.Module):
    """``deepspeed.sequence.layer.DistributedAttention`` whose all-to-alls go through a CommHook.

    Same constructor and forward as DeepSpeed's, plus ``key`` (the layer's name, e.g.
    ``"transformer_blocks.3.attn"``; Q, K and V travel in one all-to-all at ``key:qkv`` (three at
    ``key:q``, ``key:k``, ``key:v`` when their shapes differ, e.g. ``num_kv_heads``, or the hook's rules
    tell the roles apart), the output at ``key:o``) and ``hook`` (default:
    :class:`compact_hooks.PassthroughHook`, which equals DeepSpeed exactly). The backward pass
    exchanges gradients with plain all-to-alls.

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
        q, k, v = hooked_qkv_all_to_all(query, key, value, self.hook, self.key, self.spg, layout_in)
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
