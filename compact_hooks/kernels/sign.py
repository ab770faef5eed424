"""Host side of the fused sign-codec kernels (``int1``, ``int2cf``): no host reads.

Passes per step: encode = :func:`sign_abs_kernel` (residual, flag, ``|r|``) + the codec's own torch
reductions for the channel and token scales (two sums over ``|r|`` and a few ops on ``C + T``
values) + :func:`sign_pack_kernel` (codes, packing, header, base update); decode = one kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..compressors.quantize import Int1Compressor, Int2CfCompressor, matrix_dims, scale_dtype
from ..wire import FLAGS_BYTE, HEADER_NBYTES, packed_nbytes
from .common import (
    KIND_CODES,
    MAX_NUMEL,
    TILE,
    StepResult,
    check_input,
    check_payload,
    check_state,
    header_words,
    kind_args,
    launch_options,
    outputs,
    state_args,
)

SIGN_CODECS = {Int1Compressor: 0, Int2CfCompressor: 1}  # codec -> CODEBOOK constexpr


def supports(codec: object, shape: tuple[int, ...]) -> bool:
    """Whether the fused kernels implement ``codec`` for tensors of ``shape``."""
    return type(codec) in SIGN_CODECS and 0 < math.prod(shape) <= MAX_NUMEL


def _fields(payload: torch.Tensor, tokens: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(channel_scale, token_scale, codes)`` views of a payload (the scales as int16 bits)."""
    ch = payload[HEADER_NBYTES:HEADER_NBYTES + 2 * channels].view(torch.int16)
    tok = payload[HEADER_NBYTES + 2 * channels:HEADER_NBYTES + 2 * (channels + tokens)].view(torch.int16)
    return ch, tok, payload[HEADER_NBYTES + 2 * (channels + tokens):]


def encode_step(codec: Int1Compressor, mode: str, x: torch.Tensor, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None,
                previous_x: Optional[torch.Tensor] = None) -> StepResult:
    """The sender's step of :meth:`Channel.encode` (not a full send) for ``int1`` / ``int2cf``;
    see :func:`compact_hooks.kernels.group.encode_step` for what it returns."""
    import triton

    from ._sign_kernels import sign_abs_kernel, sign_pack_kernel

    check_input(x.dtype)
    x = x.contiguous()
    check_state(mode, x.shape, base, velocity, previous_x, x.dtype)
    tokens, channels = matrix_dims(tuple(x.shape))
    n = x.numel()
    enc_dtype = x.dtype if mode == "none" else torch.float32
    payload = torch.empty(codec.payload_nbytes(x.shape, enc_dtype), dtype=torch.uint8, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    out = outputs(mode, x.shape, x.dtype, base, x.device)
    if mode == "delta":
        out.previous_x = torch.empty_like(x)
        previous_x = previous_x.contiguous()
    args = state_args(mode, x, base, velocity, previous_x, out, payload, flag)
    kinds = kind_args(mode, x.dtype, base, velocity, out)
    magnitude = torch.empty((tokens, channels), dtype=enc_dtype, device=x.device)
    sign_abs_kernel[(triton.cdiv(n, TILE),)](
        x_ptr=args["x_ptr"], base_ptr=args["base_ptr"], vel_ptr=args["vel_ptr"], prev_ptr=args["prev_ptr"],
        out_prev_ptr=args["out_prev_ptr"], abs_ptr=magnitude.view(torch.int16) if enc_dtype != torch.float32
        else magnitude, flag_ptr=flag, n=n, X_KIND=kinds["X_KIND"], B_KIND=kinds["B_KIND"],
        A_KIND=KIND_CODES[enc_dtype], MODE=kinds["MODE"], HAS_VEL=kinds["HAS_VEL"], BLOCK=TILE, **launch_options())
    ch_bits, tok_bits, codes = _fields(payload, tokens, channels)
    ch16, tok16 = codec._scales(magnitude, enc_dtype)  # the codec's own reductions: identical scales
    ch_bits.copy_(ch16.view(torch.int16))
    tok_bits.copy_(tok16.view(torch.int16))
    h = header_words(enc_dtype, codec.fingerprint, n)
    _pack(sign_pack_kernel, codec, n, channels, ch_bits, tok_bits, codes, False, args, kinds, h,
          payload[:HEADER_NBYTES].view(torch.int32), enc_dtype)
    payload[FLAGS_BYTE] = flag[0]
    out.payload, out.flag = payload, flag[0] != 0
    return out


def decode_step(codec: Int1Compressor, mode: str, payload: torch.Tensor, shape: tuple[int, ...],
                dtype: torch.dtype, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None) -> StepResult:
    """The receiver's step of :meth:`Channel.decode` (not a full send) for ``int1`` / ``int2cf``."""
    from ._sign_kernels import sign_pack_kernel

    check_input(dtype)
    size = torch.Size(shape)
    mode = "ef" if mode == "delta" else mode  # a delta receiver updates its base like ef
    check_state(mode, size, base, velocity, None, dtype)
    tokens, channels = matrix_dims(tuple(size))
    expected = codec.payload_nbytes(size, dtype if mode == "none" else torch.float32)
    payload = check_payload(payload, expected, size)
    ch_bits, tok_bits, codes = _fields(payload[:expected], tokens, channels)
    out = outputs(mode, size, dtype, base, payload.device, receiver=True)
    args = state_args(mode, None, base, velocity, None, out, payload, None, payload[FLAGS_BYTE:])
    kinds = kind_args(mode, dtype, base, velocity, out)
    _pack(sign_pack_kernel, codec, size.numel(), channels, ch_bits, tok_bits, codes, True, args, kinds,
          (0, 0, 0, 0), payload, dtype if mode == "none" else torch.float32)
    return out


def _pack(kernel, codec, n: int, channels: int, ch_bits, tok_bits, codes, decode: bool, args: dict,
          kinds: dict, h: tuple[int, ...], hdr: torch.Tensor, enc_dtype: torch.dtype) -> None:
    import triton

    per_byte = 8 // codec.bits
    n_bytes = packed_nbytes(n, codec.bits)
    block = TILE // per_byte
    kernel[(triton.cdiv(n_bytes, block),)](
        hdr_ptr=hdr, ch_ptr=ch_bits, tok_ptr=tok_bits, code_ptr=codes, h0=h[0], h1=h[1], h2=h[2], h3=h[3],
        n=n, n_bytes=n_bytes, C=channels, DECODE=decode, CODEBOOK=SIGN_CODECS[type(codec)], BLOCK=block,
        PER_BYTE=per_byte, S_KIND=KIND_CODES[scale_dtype(enc_dtype)], **args, **kinds, **launch_options())
