"""``fp8``: FP8 communication, the compression users of xDiT (``--use_fp8_comms``) and cache-dit
(``--ulysses-float8``) already run: every value as one float8 byte times a scale.

cache-dit quantizes per token (one float32 scale per row of the last dim, computed per call); xDiT
uses one calibrated scale per layer and tensor. This codec computes its scales per call, one per row
(``group_size`` None, the default) or per group of ``group_size`` channels of a row, and sends them as
bfloat16 (2 bytes): the encoder divides by the rounded scale the decoder multiplies by, so only the
scale's range matters, and bfloat16 has float32's (tiny rows are not flushed to zero, huge ones are
scaled, never saturated). As a plain cast baseline it runs with residual ``none`` (bench quality's
``naive fp8``); it is also a residual codec (``ef``, ``delta``).
"""

from __future__ import annotations

import struct
from typing import Any

import torch

from ..registry import register_compressor
from ..wire import from_bytes
from .base import Compressor, numel_of
from .quantize import BF16_MAX, FP16_MAX, aligned, compute_view, group_extremes, group_layout, per_group, rounded_scales

FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def bf16_floor(value: float) -> float:
    """The largest bfloat16 number ``<= value`` (``value`` positive and finite in float32)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0] & 0xFFFF0000  # truncation: towards zero

    def as_float(b: int) -> float:
        return struct.unpack("<f", struct.pack("<I", b))[0]

    while as_float(bits) > value:  # float32 rounding of ``value`` went up
        bits -= 0x10000
    return as_float(bits)


@register_compressor("fp8")
class Fp8Compressor(Compressor):
    """FP8 per token: each value as one e4m3 byte (``format`` "e5m2": more range, one mantissa bit
    less) times its row's scale ``amax / 448`` (57344 for e5m2), or its group's with ``group_size``;
    scales bfloat16. About 2x fewer bytes than bf16: the FP8 comms of xDiT and cache-dit.

    A row (or group) is ``x[t, c0:c0+g]`` of the ``[T, C]`` view (``C`` the last dim); its largest
    magnitude lands on the format's largest value, so nothing beyond the fp8 range is saturated:
    values from 1e-30 to float32's maximum keep fp8's relative precision (2^-4 for e4m3, 2^-3 for
    e5m2), down to the subnormals of their own row. Decoding multiplies in float32 and rounds once
    into the tensor's dtype; the scale is capped so that the result stays finite there (a float16
    65504 decodes as 65408). The Channel zeroes NaN/Inf before encoding and flags them; given one
    directly, the codec still decodes finite values (a group holding NaN decodes as zeros).

    Wire: ``scales bf16 [T * ceil(C/g)] | values fp8 [T * C]`` (g = C per token).
    """

    def __init__(self, group_size: int | None = None, format: str = "e4m3") -> None:  # noqa: A002
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size must be a positive integer, or null for one scale per token; "
                             f"got {group_size!r}")
        if not isinstance(format, str) or format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}; got {format!r}")
        self.group_size = group_size
        self.format = format
        self.wire_dtype = FORMATS[format]
        self.fmax = float(torch.finfo(self.wire_dtype).max)
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "format": self.format}

    def _scale_limit(self, dtype: torch.dtype) -> float:
        """Largest scale whose products with the format's values stay finite in ``dtype``."""
        return bf16_floor((FP16_MAX if dtype == torch.float16 else BF16_MAX) / self.fmax)

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = numel_of(shape)
        if n == 0:
            return 0
        tokens, _, _, groups = group_layout(shape, self.group_size)
        return 2 * tokens * groups + n

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        if x.numel() == 0:
            return []
        tokens, channels, g, groups = group_layout(tuple(x.shape), self.group_size)
        x2, own = compute_view(x.contiguous().view(tokens, channels))
        amax = group_extremes(x2, g, groups).abs()
        # inverse +inf for subnormal scales
        s16, inv = rounded_scales(amax.float().div_(self.fmax), 0.0, self._scale_limit(x.dtype), torch.bfloat16)
        xv, inv2 = per_group(x2, inv, g, groups)
        t = xv.mul_(inv2) if own else torch.mul(xv, inv2)
        # 0 * inf and NaN inputs -> 0; values past the rounded scale's range (or +-Inf) saturate
        t.nan_to_num_(nan=0.0, posinf=self.fmax, neginf=-self.fmax).clamp_(-self.fmax, self.fmax)
        return [s16.reshape(-1), t.to(self.wire_dtype).view(torch.uint8).reshape(-1)]

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of ``uint8`` fp8 codes. The CPU casts e4m3 without vector code: there a
        lookup in the 256 values of the format (built on the device, cached) is 3-4x faster; exact
        either way."""
        if codes.device.type == "cpu" and self.format == "e4m3":
            table = self.device_cache.get(("fp8", self.format, codes.device), lambda: torch.arange(
                256, dtype=torch.uint8, device=codes.device).view(self.wire_dtype).float())
            return table.index_select(0, codes.int())
        return codes.view(self.wire_dtype).float()

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = numel_of(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype, device=body.device)
        body = aligned(body, 2)
        tokens, channels, g, groups = group_layout(shape, self.group_size)
        ns = tokens * groups
        s32 = from_bytes(body, torch.bfloat16, ns).float()
        values, scales = per_group(self._values(body[2 * ns:2 * ns + n]).view(tokens, channels), s32, g, groups)
        return values.mul_(scales).view(shape).to(dtype)
