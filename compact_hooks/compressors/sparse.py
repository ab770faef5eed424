"""Sparsifiers: ``topk`` (global largest magnitudes) and ``nm`` (n largest of every block of m).

Kept values travel as float16, clamped into its finite range (inputs beyond it saturate); the
decoder scatters them into zeros. An empty tensor has an empty body.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import register_compressor
from ..wire import bits_for, from_bytes, pack_bits, packed_nbytes, unpack_bits
from .base import Compressor, numel_of
from .quantize import FP16_MAX, aligned


def _fp16_values(v: torch.Tensor) -> torch.Tensor:
    if v.dtype == torch.float16:
        return v
    return v.float().clamp_(-FP16_MAX, FP16_MAX).to(torch.float16)  # bfloat16 cannot hold 65504


@register_compressor("topk")
class TopKCompressor(Compressor):
    """Keeps the ``k = ceil(ratio * numel)`` entries of largest |x| of the flattened tensor.

    Wire layout after the header::

        values   float16 [k]
        indices  packed to bits_for(numel) bits each [k]   (flat positions, in no particular order)
    """

    def __init__(self, ratio: float = 0.05) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio (the fraction of entries kept) must be in (0, 1]; got {ratio!r}")
        self.ratio = float(ratio)
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def kept(self, numel: int) -> int:
        """How many entries a tensor of ``numel`` elements keeps."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(round(self.ratio * numel, 6))))

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = numel_of(shape)
        k = self.kept(n)
        return 2 * k + packed_nbytes(k, bits_for(n)) if n else 0

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        n = x.numel()
        if n == 0:
            return []
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), self.kept(n), sorted=False).indices
        return [_fp16_values(flat[idx]), pack_bits(idx, bits_for(n))]

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = numel_of(shape)
        out = torch.zeros(n, dtype=dtype, device=body.device)
        if n == 0:
            return out.view(shape)
        body = aligned(body, 2)
        k = self.kept(n)
        values = from_bytes(body, torch.float16, k)
        idx = unpack_bits(body[2 * k:], bits_for(n), k).long()
        out[idx] = values.to(dtype)
        return out.view(shape)


@register_compressor("nm")
class NMCompressor(Compressor):
    """N:M sparsity: keeps the ``n`` entries of largest |x| in every block of ``m`` consecutive
    entries of the flattened tensor (the tail block is zero-padded to ``m``).

    Wire layout after the header, with ``B = ceil(numel / m)`` blocks::

        values   float16 [B * n]                  block-major
        indices  log2(m) bits each [B * n]        position inside the block, same order
    """

    def __init__(self, n: int = 2, m: int = 8) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m & (m - 1):
            raise ValueError(f"m (the block length) must be a power of two >= 2; got {m!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < m:
            raise ValueError(f"n (entries kept per block) must be an integer with 1 <= n < m = {m}; got {n!r}")
        self.n = n
        self.m = m
        self.index_bits = m.bit_length() - 1
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m}

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        kept = math.ceil(numel_of(shape) / self.m) * self.n
        return 2 * kept + packed_nbytes(kept, self.index_bits)

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        total = x.numel()
        if total == 0:
            return []
        flat = x.reshape(-1)
        pad = (-total) % self.m
        if pad:
            flat = F.pad(flat, (0, pad))
        blocks = flat.view(-1, self.m)
        idx = torch.topk(blocks.abs(), self.n, dim=1, sorted=False).indices
        return [_fp16_values(blocks.gather(1, idx)), pack_bits(idx, self.index_bits)]

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        total = numel_of(shape)
        if total == 0:
            return torch.zeros(shape, dtype=dtype, device=body.device)
        body = aligned(body, 2)
        nblocks = math.ceil(total / self.m)
        kept = nblocks * self.n
        values = from_bytes(body, torch.float16, kept).view(nblocks, self.n)
        idx = unpack_bits(body[2 * kept:], self.index_bits, kept).long().view(nblocks, self.n)
        out = torch.zeros(nblocks, self.m, dtype=dtype, device=body.device)
        out.scatter_(1, idx, values.to(dtype))
        flat = out.view(-1)
        if nblocks * self.m != total:
            flat = flat[:total]
        return flat.view(shape)
