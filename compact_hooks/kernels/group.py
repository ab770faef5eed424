"""Host side of the fused group-quantizer kernels: layouts, buffers and launches (no host reads).

Passes per step (each pass reads and writes every element once):

* encode, groups and rows on byte boundaries (``C`` and ``g`` multiples of the codes per byte, e.g.
  every ``int8`` layout, or ``int2`` with ``C = 3072``, ``g = 128``): ONE kernel
  (residual, scale, codes, packed bytes, header, base update);
* encode, any other layout: two kernels (scales and the non-finite flag, then codes, packing and
  the base update), since a byte can then hold codes of two groups;
* decode: ONE kernel (unpack, dequantize, base update), for every layout.

After the kernels, one tiny device op copies the non-finite flag into the header's flag byte.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from ..compressors.quantize import Int2Compressor, Int4Compressor, Int8Compressor, matrix_dims
from ..wire import FLAGS_BYTE, HEADER_NBYTES, PayloadKind, header_bytes, packed_nbytes

GROUP_CODECS = (Int8Compressor, Int4Compressor, Int2Compressor)
MODE_CODES = {"none": 0, "delta": 1, "ef": 2, "ef2": 3}
KIND_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TILE = 4096  # elements per program
MAX_GROUP = 8192  # larger groups do not fit one tile: the torch path handles them
MAX_NUMEL = 2**31 - 2**24  # int32 offsets inside the kernels


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


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel pointer argument of a value tensor is: 16-bit floats travel as int16 bits."""
    return t.view(torch.int16) if t.element_size() == 2 else t


def _header_words(dtype: torch.dtype, fingerprint: int, numel: int) -> tuple[int, int, int, int]:
    raw = header_bytes(PayloadKind.COMPRESSED, dtype, fingerprint, numel)
    return struct.unpack("<4i", raw)


def _launch_options() -> dict[str, object]:
    # no FMA contraction: ``r * inv + (off + 0.5)`` must round twice, like the torch codec
    return {"enable_fp_fusion": False}


@dataclass
class StepResult:
    """What one fused step produced (``None``: not part of this mode)."""

    recon: torch.Tensor
    base: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None
    previous_x: Optional[torch.Tensor] = None
    payload: Optional[torch.Tensor] = None
    flag: Optional[torch.Tensor] = None  # 0-dim bool on the device (encode only)


def _outputs(mode: str, shape: torch.Size, x_dtype: torch.dtype, base: Optional[torch.Tensor],
             has_velocity: bool, device: torch.device) -> StepResult:
    if mode == "none":
        return StepResult(recon=torch.empty(shape, dtype=x_dtype, device=device))
    assert base is not None
    new_base = torch.empty(shape, dtype=base.dtype, device=device)
    recon = new_base if base.dtype == x_dtype else torch.empty(shape, dtype=x_dtype, device=device)
    velocity = torch.empty_like(new_base) if mode == "ef2" else None
    return StepResult(recon=recon, base=new_base, velocity=velocity)


def _check_state(mode: str, shape: torch.Size, base: Optional[torch.Tensor], velocity: Optional[torch.Tensor],
                 previous_x: Optional[torch.Tensor], x_dtype: torch.dtype) -> None:
    if mode not in MODE_CODES:
        raise ValueError(f"residual mode must be one of {', '.join(MODE_CODES)}; got {mode!r}")
    if mode == "none":
        return
    if base is None or base.shape != shape or base.dtype not in KIND_CODES:
        raise ValueError(f"mode {mode!r} needs a float base of shape {tuple(shape)}; got "
                         f"{None if base is None else (tuple(base.shape), base.dtype)}")
    if velocity is not None and (velocity.shape != shape or velocity.dtype != base.dtype):
        raise ValueError("the ef2 velocity must have the base's shape and dtype")
    if mode == "delta" and (previous_x is None or previous_x.shape != shape or previous_x.dtype != x_dtype):
        raise ValueError("mode 'delta' needs the previous x, of the input's shape and dtype")


def encode_step(codec: Int8Compressor, mode: str, x: torch.Tensor, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None,
                previous_x: Optional[torch.Tensor] = None) -> StepResult:
    """The sender's step of :meth:`Channel.encode` (not a full send) for a group quantizer, fused.

    Returns the payload (byte-identical to the torch path's, flag byte included), the
    reconstruction (NOT yet poisoned for a non-finite input: the caller applies ``flag``), the new
    base / velocity / previous x (new tensors; the inputs are not written) and the flag.
    """
    import triton  # noqa: F401  (a clear ImportError before any launch)

    from ._group_kernels import flat_kernel, group_tile_kernel

    if x.dtype not in KIND_CODES:
        raise TypeError(f"the fused codecs take float32, float16 or bfloat16 tensors; got {x.dtype}")
    x = x.contiguous()
    _check_state(mode, x.shape, base, velocity, previous_x, x.dtype)
    grid = codec.grid
    layout = Layout.of(tuple(x.shape), codec.group_size, grid.bits)
    enc_dtype = x.dtype if mode == "none" else torch.float32  # the residual is float32
    device = x.device
    payload = torch.empty(codec.payload_nbytes(x.shape, enc_dtype), dtype=torch.uint8, device=device)
    hdr = payload[:HEADER_NBYTES].view(torch.int32)
    scales = payload[HEADER_NBYTES:HEADER_NBYTES + 2 * layout.n_scales].view(torch.int16)
    codes = payload[HEADER_NBYTES + 2 * layout.n_scales:]
    flag_buf = torch.zeros(1, dtype=torch.int32, device=device)
    out = _outputs(mode, x.shape, x.dtype, base, velocity is not None, device)
    if mode == "delta":
        out.previous_x = torch.empty_like(x)
    dummy = payload
    args = dict(
        x_ptr=_bits_view(x), base_ptr=_bits_view(base) if base is not None else dummy,
        vel_ptr=_bits_view(velocity) if velocity is not None else dummy,
        prev_ptr=_bits_view(previous_x.contiguous()) if previous_x is not None else dummy,
        out_base_ptr=_bits_view(out.base) if out.base is not None else dummy,
        out_vel_ptr=_bits_view(out.velocity) if out.velocity is not None else dummy,
        out_prev_ptr=_bits_view(out.previous_x) if out.previous_x is not None else dummy,
        out_recon_ptr=_bits_view(out.recon), flag_ptr=flag_buf,
    )
    kinds = dict(X_KIND=KIND_CODES[x.dtype], B_KIND=KIND_CODES[base.dtype] if base is not None else 0,
                 MODE=MODE_CODES[mode], HAS_VEL=velocity is not None,
                 WRITE_RECON=mode == "none" or out.recon is not out.base)
    h = _header_words(enc_dtype, codec.fingerprint, x.numel())
    tile_grid = (triton.cdiv(layout.n_scales, layout.block_groups),)
    group_tile_kernel[tile_grid](
        hdr_ptr=hdr, scale_ptr=scales, code_ptr=codes, h0=h[0], h1=h[1], h2=h[2], h3=h[3],
        n_groups=layout.n_scales, groups=layout.groups, C=layout.channels, g=layout.group,
        limit=grid.scale_limit(enc_dtype), DECODE=False, PACK=layout.aligned, BITS=grid.bits,
        BLOCK_G=layout.block_groups, GPB=layout.group_bytes_p2, PER_BYTE=layout.per_byte,
        **args, **kinds, **_launch_options())
    if not layout.aligned:
        n_bytes = packed_nbytes(layout.numel, grid.bits)
        block = TILE // layout.per_byte
        flat_kernel[(triton.cdiv(n_bytes, block),)](
            scale_ptr=scales, code_ptr=codes, n=layout.numel, n_bytes=n_bytes, groups=layout.groups,
            C=layout.channels, g=layout.group, DECODE=False, BITS=grid.bits, BLOCK=block,
            PER_BYTE=layout.per_byte, **args, **kinds, **_launch_options())
    payload[FLAGS_BYTE] = flag_buf[0]
    out.payload = payload
    out.flag = flag_buf[0] != 0
    return out


def decode_step(codec: Int8Compressor, mode: str, payload: torch.Tensor, shape: tuple[int, ...],
                dtype: torch.dtype, base: Optional[torch.Tensor],
                velocity: Optional[torch.Tensor] = None) -> StepResult:
    """The receiver's step of :meth:`Channel.decode` (not a full send) for a group quantizer, fused:
    the reconstruction in ``dtype`` (not yet poisoned) and the new base / velocity."""
    import triton  # noqa: F401

    from ._group_kernels import flat_kernel, group_tile_kernel

    if dtype not in KIND_CODES:
        raise TypeError(f"the fused codecs decode to float32, float16 or bfloat16; got {dtype}")
    size = torch.Size(shape)
    _check_state("ef" if mode == "delta" else mode, size, base, velocity, None, dtype)
    grid = codec.grid
    layout = Layout.of(tuple(size), codec.group_size, grid.bits)
    expected = codec.payload_nbytes(size, dtype if mode == "none" else torch.float32)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() < expected:
        raise ValueError(f"expected a 1-D uint8 payload of {expected} bytes for shape {tuple(size)}; "
                         f"got {payload.dtype} of shape {tuple(payload.shape)}")
    if payload.storage_offset() % 2 or not payload.is_contiguous():
        payload = payload.contiguous().clone()  # a slice of a gathered buffer may start at an odd byte
    device = payload.device
    scales = payload[HEADER_NBYTES:HEADER_NBYTES + 2 * layout.n_scales].view(torch.int16)
    codes = payload[HEADER_NBYTES + 2 * layout.n_scales:expected]
    # delta receivers update the base like ef (Channel._update predicts the base)
    kernel_mode = "ef" if mode == "delta" else mode
    out = _outputs(kernel_mode, size, dtype, base, velocity is not None, device)
    dummy = payload
    args = dict(
        x_ptr=dummy, prev_ptr=dummy, out_prev_ptr=dummy, flag_ptr=dummy,
        base_ptr=_bits_view(base) if base is not None else dummy,
        vel_ptr=_bits_view(velocity) if velocity is not None else dummy,
        out_base_ptr=_bits_view(out.base) if out.base is not None else dummy,
        out_vel_ptr=_bits_view(out.velocity) if out.velocity is not None else dummy,
        out_recon_ptr=_bits_view(out.recon),
    )
    kinds = dict(X_KIND=KIND_CODES[dtype], B_KIND=KIND_CODES[base.dtype] if base is not None else 0,
                 MODE=MODE_CODES[kernel_mode], HAS_VEL=velocity is not None,
                 WRITE_RECON=kernel_mode == "none" or out.recon is not out.base)
    if layout.aligned:
        group_tile_kernel[(triton.cdiv(layout.n_scales, layout.block_groups),)](
            hdr_ptr=dummy, scale_ptr=scales, code_ptr=codes, h0=0, h1=0, h2=0, h3=0,
            n_groups=layout.n_scales, groups=layout.groups, C=layout.channels, g=layout.group,
            limit=0.0, DECODE=True, PACK=False, BITS=grid.bits, BLOCK_G=layout.block_groups,
            GPB=layout.group_bytes_p2, PER_BYTE=layout.per_byte, **args, **kinds, **_launch_options())
    else:
        n_bytes = packed_nbytes(layout.numel, grid.bits)
        block = TILE // layout.per_byte
        flat_kernel[(triton.cdiv(n_bytes, block),)](
            scale_ptr=scales, code_ptr=codes, n=layout.numel, n_bytes=n_bytes, groups=layout.groups,
            C=layout.channels, g=layout.group, DECODE=True, BITS=grid.bits, BLOCK=block,
            PER_BYTE=layout.per_byte, **args, **kinds, **_launch_options())
    return out
