"""The payload header and bit-packing helpers.

Every payload is one contiguous ``uint8`` tensor: a 16-byte header followed by the codec's packed fields.

Header layout (little endian)::

    0..1   magic b"CH"
    2      wire version
    3      payload kind (0 compressed, 1 raw tensor bytes)
    4      dtype code of the encoded tensor
    5      flags (bit 0: the sender's tensor had NaN/Inf, zeroed before encoding)
    6..7   reserved (zero)
    8..11  fingerprint of the compressor spec (crc32 of its canonical JSON)
    12..15 number of elements of the encoded tensor (mod 2**32)
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Hashable, Mapping

import torch

from .errors import ProtocolError

HEADER_NBYTES = 16
FLAGS_BYTE = 5
WIRE_VERSION = 3  # 2: bfloat16 scales for float32/bfloat16 tensors; 3: fp16 bodies end in a float32 scale
MAGIC = b"CH"

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


class PayloadKind(IntEnum):
    COMPRESSED = 0
    RAW = 1


@dataclass(frozen=True)
class Header:
    """A parsed payload header."""

    version: int
    kind: PayloadKind
    dtype: torch.dtype
    fingerprint: int
    numel: int


def spec_fingerprint(spec: Mapping[str, Any]) -> int:
    """A 32-bit fingerprint of a compressor spec; equal specs give equal fingerprints on every rank."""
    canonical = json.dumps(dict(spec), sort_keys=True, separators=(",", ":"), default=str)
    return zlib.crc32(canonical.encode())


def header_bytes(kind: PayloadKind, dtype: torch.dtype, fingerprint: int, numel: int) -> bytes:
    """The 16 header bytes of a payload."""
    return (
        MAGIC
        + bytes([WIRE_VERSION, int(kind), DTYPE_CODES[dtype], 0, 0, 0])
        + int(fingerprint & 0xFFFFFFFF).to_bytes(4, "little")
        + int(numel & 0xFFFFFFFF).to_bytes(4, "little")
    )


def header_tensor(kind: PayloadKind, dtype: torch.dtype, fingerprint: int, numel: int,
                  device: torch.device) -> torch.Tensor:
    """The header as a new ``uint8`` tensor on ``device`` (built on the host and copied: on a GPU
    that copy synchronises, so the hot path takes headers from a :class:`DeviceCache`)."""
    raw = header_bytes(kind, dtype, fingerprint, numel)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


class DeviceCache:
    """Small constant tensors (payload headers, decode tables) built once per device and key.

    Building such a tensor on the host and copying it to a GPU blocks the host until the stream
    catches up; a cached copy is reused with device-to-device copies only. Least recently used
    entries beyond ``capacity`` are dropped, so the cache stays small for any number of shapes.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor cached under ``key``, built by ``build()`` the first time."""
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = build()
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return item

    def header(self, kind: PayloadKind, dtype: torch.dtype, fingerprint: int, numel: int,
               device: torch.device) -> torch.Tensor:
        """A cached :func:`header_tensor` (callers must not write into it: copy first)."""
        device = torch.device(device)
        return self.get(("header", kind, dtype, fingerprint, numel, device),
                        lambda: header_tensor(kind, dtype, fingerprint, numel, device))


def parse_header(payload: torch.Tensor) -> Header:
    """Read the header of one payload (copies 16 bytes to the host)."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() < HEADER_NBYTES:
        raise ProtocolError(
            f"a payload must be a 1-D uint8 tensor of at least {HEADER_NBYTES} bytes; got "
            f"{payload.dtype} of shape {tuple(payload.shape)}"
        )
    raw = bytes(payload[:HEADER_NBYTES].cpu().tolist())
    if raw[:2] != MAGIC:
        raise ProtocolError(f"payload does not start with the compact-hooks magic {MAGIC!r}: {raw[:2]!r}")
    if raw[4] not in CODE_DTYPES or raw[3] not in (0, 1):
        raise ProtocolError(f"payload header is corrupt (kind {raw[3]}, dtype code {raw[4]})")
    return Header(
        version=raw[2],
        kind=PayloadKind(raw[3]),
        dtype=CODE_DTYPES[raw[4]],
        fingerprint=int.from_bytes(raw[8:12], "little"),
        numel=int.from_bytes(raw[12:16], "little"),
    )


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits each take when packed."""
    return math.ceil(count * bits / 8)


def bits_for(count: int) -> int:
    """Bits needed to index ``count`` distinct values (at least 1)."""
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor, first code in the low bits.

    1, 2, 4 and 8 bits pack by shifting groups of codes into bytes; other widths (up to 32) go
    through a bit-plane expansion. Both are vectorized.
    """
    flat = codes.reshape(-1)
    count = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        pad = (-count) % per_byte
        c = flat.to(torch.uint8)
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        c = c.view(-1, per_byte)
        out = c[:, 0].clone()
        for i in range(1, per_byte):
            out |= c[:, i] << (bits * i)
        return out
    if not 0 < bits <= 32:
        raise ValueError(f"pack_bits supports 1..32 bits, got {bits}")
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int64)
    planes = ((flat.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-planes.numel()) % 8
    if pad:
        planes = torch.cat([planes, planes.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (planes.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as ``uint8`` (bits <= 8) or ``int64`` (wider)."""
    if bits == 8:
        return packed[:count]
    if bits in (1, 2, 4):
        mask = (1 << bits) - 1
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(1) >> shifts) & mask
        return codes.reshape(-1)[:count]
    if not 0 < bits <= 32:
        raise ValueError(f"unpack_bits supports 1..32 bits, got {bits}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    planes = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits].view(count, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (planes.to(torch.int64) * weights).sum(dim=1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's memory."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(raw: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Reinterpret ``raw`` bytes as ``count`` elements of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = raw[: count * itemsize]
    if chunk.storage_offset() % itemsize or not chunk.is_contiguous():
        chunk = chunk.clone()  # a payload cut out of a gathered buffer may start at an odd byte
    return chunk.view(dtype)


def encode_raw(x: torch.Tensor, fingerprint: int, cache: DeviceCache | None = None) -> torch.Tensor:
    """A RAW payload: the header then ``x``'s own bytes (full sends during warm-up and resync).
    With ``cache`` the header comes from it (no host-to-device copy)."""
    if cache is None:
        header = header_tensor(PayloadKind.RAW, x.dtype, fingerprint, x.numel(), x.device)
    else:
        header = cache.header(PayloadKind.RAW, x.dtype, fingerprint, x.numel(), x.device)
    return torch.cat([header, as_bytes(x)])


def raw_nbytes(numel: int, dtype: torch.dtype) -> int:
    return HEADER_NBYTES + numel * torch.empty((), dtype=dtype).element_size()


def decode_raw(payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    count = math.prod(shape)
    return from_bytes(payload[HEADER_NBYTES:], dtype, count).view(shape)
