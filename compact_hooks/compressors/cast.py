"""Casts: ``none`` (the tensor's own bytes), ``fp16`` and ``bf16``. Summable by ``all_reduce``."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_compressor
from ..wire import FLOAT_DTYPES, from_bytes
from .base import Compressor, numel_of


@register_compressor("none")
class NoneCompressor(Compressor):
    """Sends the tensor's bytes unchanged (the exact baseline)."""

    summable = True
    lossless_dtypes = frozenset(FLOAT_DTYPES)

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return numel_of(shape) * torch.empty((), dtype=dtype).element_size()

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        return [x]

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return from_bytes(body, dtype, numel_of(shape)).view(shape)


class _CastCompressor(Compressor):
    wire_dtype: torch.dtype
    summable = True

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return numel_of(shape) * 2

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        return [x.to(self.wire_dtype)]

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return from_bytes(body, self.wire_dtype, numel_of(shape)).view(shape).to(dtype)


FP16_MAX = 65504.0


def fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """The float32 power of two (at least 1) that brings ``x``'s largest finite magnitude within
    float16's range, on ``x``'s device (no host read). 1 for float16 input, empty tensors, and
    tensors whose largest magnitude is non-finite (those keep a plain cast)."""
    one = torch.ones((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return one
    amax = torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)
    ratio = torch.nan_to_num(amax, nan=0.0, posinf=0.0) / FP16_MAX
    _, exponent = torch.frexp(ratio)  # ratio = m * 2^e, m in [0.5, 1): ratio / 2^e < 1
    return torch.where(ratio > 1, torch.ldexp(one, exponent), one)


@register_compressor("fp16")
class Fp16Compressor(_CastCompressor):
    """Casts to float16 on the wire (lossless for float16 input). A float32 or bfloat16 tensor beyond
    float16's range (65504) is divided by a power of two first, so that it fits: decoded values are
    finite and within float16's relative precision (2^-11 of the largest magnitude) up to float32's
    range. Body: the float16 values, then that scale as float32 (1 when the tensor fits).

    Not summable: ranks' scales differ, so all_reduce takes the compressed two-stage path instead of
    summing float16 casts (whose sum could overflow)."""

    wire_dtype = torch.float16
    lossless_dtypes = frozenset({torch.float16})
    summable = False

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return numel_of(shape) * 2 + 4

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        scale = fp16_scale(x)  # a power of two: dividing by it is exact (short of underflow)
        return [(x * scale.reciprocal().to(x.dtype)).to(torch.float16), scale]

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = numel_of(shape)
        values = from_bytes(body, torch.float16, n).view(shape).to(dtype)
        return values * from_bytes(body[2 * n:], torch.float32, 1).view(()).to(dtype)


@register_compressor("bf16")
class Bf16Compressor(_CastCompressor):
    """Casts to bfloat16 on the wire (lossless for bfloat16 input)."""

    wire_dtype = torch.bfloat16
    lossless_dtypes = frozenset({torch.bfloat16})
