"""The Compressor interface: a stateless codec from a float tensor to one ``uint8`` payload."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch

from ..wire import FLOAT_DTYPES, HEADER_NBYTES, DeviceCache, PayloadKind, as_bytes, encode_raw, spec_fingerprint

Shape = Sequence[int]


def numel_of(shape: Shape) -> int:
    return int(math.prod(shape))


def check_float(x: torch.Tensor, who: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{who} compresses float32, float16 or bfloat16 tensors; got {x.dtype}. "
            "Non-float tensors are never compressed: send them through PassthroughHook."
        )


class Compressor(ABC):
    """A codec. ``encode(x)`` returns one contiguous ``uint8`` payload of exactly
    ``payload_nbytes(x.shape, x.dtype)`` bytes (header included); ``decode`` inverts it.

    Subclasses implement :meth:`body_nbytes`, :meth:`encode_body` and :meth:`decode_body`, take
    their parameters as keyword arguments of ``__init__`` and validate them there (raise
    ``ValueError`` naming the parameter). Capabilities are declared as class attributes:

    * ``summable``: payload bodies are plain numbers that ``all_reduce`` may add (casts only);
    * ``lossless_dtypes``: input dtypes for which ``decode(encode(x))`` equals ``x`` bit for bit;
    * ``variable_size``: payload lengths vary per call (then ``payload_nbytes`` is an upper bound);
    * ``needs_error_feedback``: usable only with residual ``ef`` or ``ef2`` (checked by the config).

    A codec that wants per-stream state (a warm-start basis) receives the channel's ``state`` dict
    in ``encode``; the codec itself holds none, apart from :attr:`device_cache` (headers and
    decode tables built once per device, so encode and decode never copy host data to a GPU).
    """

    name: ClassVar[str] = ""
    summable: ClassVar[bool] = False
    lossless_dtypes: ClassVar[frozenset[torch.dtype]] = frozenset()
    # payload length varies per call (``payload_nbytes`` is then an upper bound): collectives exchange sizes
    variable_size: ClassVar[bool] = False
    # the channel puts the activation's norm into ``state["activation_norm"]`` before encoding a residual
    wants_activation_norm: ClassVar[bool] = False
    # only meaningful with error feedback (residual "ef"/"ef2"): config validation refuses other modes
    needs_error_feedback: ClassVar[bool] = False

    def __init__(self) -> None:
        self._fingerprint = spec_fingerprint(self.spec())

    # -- description ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The codec's parameters, as given to ``__init__``."""
        return {}

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: enough to rebuild the codec with ``build_compressor``."""
        return {"name": self.name, **self.params()}

    @property
    def fingerprint(self) -> int:
        return self._fingerprint

    @property
    def device_cache(self) -> DeviceCache:
        """Constant tensors per device (headers, lookup tables) for this codec."""
        cache = self.__dict__.get("_device_cache")
        if cache is None:
            cache = self.__dict__["_device_cache"] = DeviceCache()
        return cache

    def is_lossless(self, dtype: torch.dtype) -> bool:
        return dtype in self.lossless_dtypes

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # -- sizes ---------------------------------------------------------------------------------
    def payload_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        """Exact payload length for a tensor of ``shape`` and ``dtype``."""
        return HEADER_NBYTES + self.body_nbytes(tuple(shape), dtype)

    @abstractmethod
    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes of the packed fields after the header."""

    # -- codec ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, state: dict[str, Any] | None = None) -> torch.Tensor:
        """Compress ``x`` into one ``uint8`` payload."""
        check_float(x, f"compressor {self.name!r}")
        header = self.device_cache.header(PayloadKind.COMPRESSED, x.dtype, self._fingerprint, x.numel(), x.device)
        fields = [as_bytes(f) for f in self.encode_body(x, state)]
        payload = torch.cat([header, *fields])
        expected = self.payload_nbytes(x.shape, x.dtype)
        if payload.numel() != expected:  # a codec bug, never a user error
            raise AssertionError(f"{self!r} wrote {payload.numel()} bytes, declared {expected}")
        return payload

    def plan(self, states: list[dict[str, Any]], residuals: list[torch.Tensor],
             activations: list[torch.Tensor]) -> None:
        """Before the encodes of one collective, for codecs that size each call (``variable_size``):
        choose what each stream sends, ``residuals[i]`` being the residual of ``activations[i]``, with
        at most one host read for all of them, and leave the choice in ``states[i]`` (the stream's
        state, passed to its ``encode``). Default: nothing."""

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """A RAW payload of ``x`` (full sends) under this codec's fingerprint."""
        return encode_raw(x, self._fingerprint, self.device_cache)

    def decode(self, payload: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Reconstruct a tensor of ``shape`` and ``dtype`` from ``payload``."""
        return self.decode_body(payload[HEADER_NBYTES:], tuple(shape), dtype)

    @abstractmethod
    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        """The packed fields, in order; each is viewed as bytes and concatenated."""

    @abstractmethod
    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`encode_body`."""
