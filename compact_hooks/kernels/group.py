"""Host side of the fused group-quantizer kernels: layouts, buffers and launches (no host reads).

Passes per step (each pass reads and writes every element once):

* encode, groups and rows on byte boundaries (``C`` and ``g`` multiples of the codes per byte, e.g.
  every ``int8`` layout, or ``int2`` with ``C = 3072``, ``g = 128``): ONE kernel
  (residual, scale, codes, packed bytes, header, base update);
* encode, any other layout: two kernels (scales and the non-finite flag, then codes, packing and
  the base update), since a byte can then hold codes of two groups;
* decode: ONE kernel (unpack, dequantize, base update), for every layout.

Around them, a sender makes a few device ops on single values (zero the non-finite flag, copy it into
the header's flag byte) and the caller's one ``torch.where`` pass for the all-NaN output of a flagged
step; a receiver's kernel reads the flag byte itself and writes its output NaN (never its base).
Every step writes new tensors (the old base is never written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..compressors.quantize import Int2Compressor, Int4Compressor, Int8Compressor, matrix_dims, scale_dtype
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

GROUP_CODECS = (Int8Compressor, Int4Compressor, Int2Compressor)
MAX_GROUP = 8192  # larger groups do not fit one tile: the torch path handles them


@dataclass(frozen=True)
class Layout:
    """Where a ``[T, C]`` tensor's groups and codes sit, and how the kernels tile it."""

    tokens: int
    channels: int
    group: int
    groups: int
    bits: int

    @classmethod
    def of(cls, shape: tuple[int, ...], group_size: int, bits: int) -> "Layout":
        tokens, channels = matrix_dims(shape)
        g = min(group_size, channels)
        return cls(tokens, channels, g, math.ceil(channels / g), bits)

    @property
    def numel(self) -> int:
        return self.tokens * self.channels

    @property
    def n_scales(self) -> int:
        return self.tokens * self.groups

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def aligned(self) -> bool:
        """Every group starts on a byte boundary and fills whole bytes: one-pass encode."""
        return self.channels % self.per_byte == 0 and self.group % self.per_byte == 0

    @property
    def group_bytes_p2(self) -> int:
        """Bytes of one group's codes, padded to a power of two (the tile's middle axis)."""
        return max(1, triton_next_pow2(self.group) // self.per_byte)

    @property
    def block_groups(self) -> int:
        return max(1, TILE // (self.group_bytes_p2 * self.per_byte))

    @property
    def tile_elements(self) -> int:
        """Values one program of the group-tile kernel handles (padding included)."""
        return self.block_groups * self.group_bytes_p2 * self.per_byte


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def supports(codec: object, shape: tuple[int, ...]) -> bool:
    """Whether the fused kernels implement ``codec`` for tensors of ``shape``."""
    if type(codec) not in GROUP_CODECS:
        return False
    n = math.prod(shape)
    if n == 0 or n > MAX_NUMEL:
        return False
    layout = Layout.of(tuple(shape), codec.group_size, codec.grid.bits)
    return triton_next_pow2(layout.group) <= MAX_GROUP


def encode_step(codec: Int8Compressor, mode: str, x: torch.Tensor, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None,
                previous_x: Optional[torch.Tensor] = None) -> StepResult:
    """The sender's step of :meth:`Channel.encode` (not a full send) for a group quantizer, fused.

    Returns the payload (byte-identical to the torch path's, flag byte included), the
    reconstruction (NOT yet poisoned for a non-finite input: the caller applies ``flag``), the new
    base / velocity / previous x (new tensors; the inputs are not written) and the flag.
    """
    import triton  # a clear ImportError before any launch

    from ._group_kernels import flat_kernel, group_tile_kernel

    check_input(x.dtype)
    x = x.contiguous()
    check_state(mode, x.shape, base, velocity, previous_x, x.dtype)
    grid = codec.grid
    layout = Layout.of(tuple(x.shape), codec.group_size, grid.bits)
    enc_dtype = x.dtype if mode == "none" else torch.float32  # the residual is float32
    payload = torch.empty(codec.payload_nbytes(x.shape, enc_dtype), dtype=torch.uint8, device=x.device)
    scales = payload[HEADER_NBYTES:HEADER_NBYTES + 2 * layout.n_scales].view(torch.int16)
    codes = payload[HEADER_NBYTES + 2 * layout.n_scales:]
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    out = outputs(mode, x.shape, x.dtype, base, x.device)
    if mode == "delta":
        out.previous_x = torch.empty_like(x)
        previous_x = previous_x.contiguous()
    args = state_args(mode, x, base, velocity, previous_x, out, payload, flag)
    kinds = kind_args(mode, x.dtype, base, velocity, out)
    kinds["S_KIND"] = KIND_CODES[scale_dtype(enc_dtype)]
    h = header_words(enc_dtype, codec.fingerprint, x.numel())
    group_tile_kernel[(triton.cdiv(layout.n_scales, layout.block_groups),)](
        hdr_ptr=payload[:HEADER_NBYTES].view(torch.int32), scale_ptr=scales, code_ptr=codes,
        h0=h[0], h1=h[1], h2=h[2], h3=h[3], n_groups=layout.n_scales, groups=layout.groups,
        C=layout.channels, g=layout.group, limit=grid.scale_limit(enc_dtype, scale_dtype(enc_dtype)), DECODE=False,
        PACK=layout.aligned, BITS=grid.bits, BLOCK_G=layout.block_groups, GPB=layout.group_bytes_p2,
        PER_BYTE=layout.per_byte, **args, **kinds, **launch_options(layout.tile_elements))
    if not layout.aligned:
        _flat(flat_kernel, layout, scales, codes, False, args, kinds)
    payload[FLAGS_BYTE] = flag[0]
    out.payload, out.flag = payload, flag[0] != 0
    return out


def decode_step(codec: Int8Compressor, mode: str, payload: torch.Tensor, shape: tuple[int, ...],
                dtype: torch.dtype, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None) -> StepResult:
    """The receiver's step of :meth:`Channel.decode` (not a full send) for a group quantizer, fused:
    the reconstruction in ``dtype`` (all-NaN when the payload's flag byte is set, as the torch path
    returns it) and the new base / velocity."""
    import triton

    from ._group_kernels import flat_kernel, group_tile_kernel

    check_input(dtype)
    size = torch.Size(shape)
    mode = "ef" if mode == "delta" else mode  # a delta receiver updates its base like ef
    check_state(mode, size, base, velocity, None, dtype)
    grid = codec.grid
    layout = Layout.of(tuple(size), codec.group_size, grid.bits)
    expected = codec.payload_nbytes(size, dtype if mode == "none" else torch.float32)
    payload = check_payload(payload, expected, size)
    scales = payload[HEADER_NBYTES:HEADER_NBYTES + 2 * layout.n_scales].view(torch.int16)
    codes = payload[HEADER_NBYTES + 2 * layout.n_scales:expected]
    out = outputs(mode, size, dtype, base, payload.device, receiver=True)
    args = state_args(mode, None, base, velocity, None, out, payload, None, payload[FLAGS_BYTE:])
    kinds = kind_args(mode, dtype, base, velocity, out)
    kinds["S_KIND"] = KIND_CODES[scale_dtype(dtype if mode == "none" else torch.float32)]
    if layout.aligned:
        group_tile_kernel[(triton.cdiv(layout.n_scales, layout.block_groups),)](
            hdr_ptr=payload, scale_ptr=scales, code_ptr=codes, h0=0, h1=0, h2=0, h3=0,
            n_groups=layout.n_scales, groups=layout.groups, C=layout.channels, g=layout.group,
            limit=0.0, DECODE=True, PACK=False, BITS=grid.bits, BLOCK_G=layout.block_groups,
            GPB=layout.group_bytes_p2, PER_BYTE=layout.per_byte, **args, **kinds,
            **launch_options(layout.tile_elements))
    else:
        _flat(flat_kernel, layout, scales, codes, True, args, kinds)
    return out


def _flat(kernel, layout: Layout, scales: torch.Tensor, codes: torch.Tensor, decode: bool,
          args: dict, kinds: dict) -> None:
    """Launch :func:`flat_kernel` over the packed codes (any layout)."""
    import triton

    n_bytes = packed_nbytes(layout.numel, layout.bits)
    block = TILE // layout.per_byte
    kernel[(triton.cdiv(n_bytes, block),)](
        scale_ptr=scales, code_ptr=codes, n=layout.numel, n_bytes=n_bytes, groups=layout.groups,
        C=layout.channels, g=layout.group, DECODE=decode, BITS=layout.bits, BLOCK=block,
        PER_BYTE=layout.per_byte, **args, **kinds, **launch_options())
