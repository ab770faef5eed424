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


@register_compressor("fp16")
class Fp16Compressor(_CastCompressor):
    """Casts to float16 on the wire (lossless for float16 input)."""

    wire_dtype = torch.float16
    lossless_dtypes = frozenset({torch.float16})


@register_compressor("bf16")
class Bf16Compressor(_CastCompressor):
    """Casts to bfloat16 on the wire (lossless for bfloat16 input)."""

    wire_dtype = torch.bfloat16
    lossless_dtypes = frozenset({torch.bfloat16})
