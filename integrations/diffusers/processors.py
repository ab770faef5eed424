"""Sequence-parallel attention processors for diffusers' Flux, SD3, PixArt/DiT and CogVideoX attentions.

Each processor does what the model's stock processor does (projections, QK norms, rotary embedding,
joint text+image concatenation, output projections) on this rank's tokens, and replaces the attention
itself by :func:`~.attention.sequence_parallel_attention`. The layout of the local sequence
comes from the model's :class:`~.sharding.ShardState`.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .attention import sequence_parallel_attention
from .sharding import ShardState


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H*D] -> [B, S, H, D]``."""
    return x.unflatten(-1, (heads, -1))


def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn``'s q, k, v of ``x`` as ``[B, S, H, D]``, with its q/k norms applied."""
    q, k, v = (_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _no_mask(attention_mask: Optional[torch.Tensor], where: str) -> None:
    if attention_mask is not None:
        raise NotImplementedError(
            f"{where}: sequence-parallel self-attention does not support an attention_mask; call the model "
            f"without one (cross-attention masks are fine)"
        )


class ParallelProcessor:
    """Base: knows its call-site key (the attention module's name) and the model's shard state."""

    def __init__(self, key: str, state: ShardState) -> None:
        self.key = key
        self.state = state

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *orders: tuple[str, ...]) -> torch.Tensor:
        layout = self.state.layout_for(q.shape[1], *orders, where=self.key)
        return sequence_parallel_attention(q, k, v, self.state.comm, self.key, layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, mode={self.state.comm.mode!r})"


class FluxParallelProcessor(ParallelProcessor):
    """For ``FluxAttention`` (double-stream blocks: text+image; single-stream blocks: the joint sequence)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
    ):
        _no_mask(attention_mask, self.key)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)

        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        out = self.attend(q, k, v, ("text", "image"), ("image",)).flatten(2, 3).to(q.dtype)

        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        enc_out, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        enc_out = attn.to_add_out(enc_out.contiguous())
        return out, enc_out


class JointParallelProcessor(ParallelProcessor):
    """For SD3's ``Attention`` with ``JointAttnProcessor2_0`` (image tokens first, then text; SD3.5's
    second, image-only attention too)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        _no_mask(attention_mask, self.key)
        heads = attn.heads
        q, k, v = _qkv(attn, hidden_states)
        if encoder_hidden_states is not None:
            enc = encoder_hidden_states
            eq, ek, ev = (_heads(f(enc), heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)

        out = self.attend(q, k, v, ("image", "text"), ("image",)).flatten(2, 3).to(q.dtype)

        enc_out = None
        if encoder_hidden_states is not None:
            n = hidden_states.shape[1]
            out, enc_out = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                enc_out = attn.to_add_out(enc_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, enc_out)


class SelfParallelProcessor(ParallelProcessor):
    """For the image self-attention (``attn1``) of PixArt and DiT blocks (``AttnProcessor2_0``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        _no_mask(attention_mask, self.key)
        if encoder_hidden_states is not None:
            raise RuntimeError(f"{self.key}: a sequence-parallel self-attention processor got encoder_hidden_states")
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError(f"{self.key}: only token-sequence self-attention ([B, S, C]) is supported")
        residual = hidden_states
        q, k, v = _qkv(attn, hidden_states)
        out = self.attend(q, k, v, ("image",)).flatten(2, 3).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CogVideoXParallelProcessor(ParallelProcessor):
    """For CogVideoX's ``CogVideoXAttnProcessor2_0`` (text tokens, then video tokens with rotary)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        _no_mask(attention_mask, self.key)
        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = _qkv(attn, x)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :text], apply_rotary_emb(q[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :text], apply_rotary_emb(k[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
        out = self.attend(q, k, v, ("text", "image")).flatten(2, 3).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        enc_out, out = out.split([text, out.shape[1] - text], dim=1)
        return out, enc_out
