"""``auto``: per call, the sender picks a level of a small ladder (skip / int1 / int2 / int4 / int8)
from the residual's size relative to the activation, and writes the choice into the payload header.

The rule: with ``rel = ||residual|| / ||activation||`` and each level's typical relative error
``c`` on a residual (measured on Gaussian and Student-t(3) data: int1 0.6-0.78, int2 0.42-0.56,
int4 0.10-0.20, int8 0.006-0.014; the constants below sit between), the level sent is the cheapest
whose expected error ``c * rel`` is within ``target_rel_error``; when ``rel`` itself is within the
target the call sends only a header ("skip": the base stays, error feedback carries the residual
into the next step). Payload sizes therefore vary per call: :attr:`variable_size` tells the
collectives to exchange sizes first, and :meth:`payload_nbytes` is the largest possible size.

Wire: the common 16-byte header, whose byte 6 holds the level (0 = skip, else 1 + ladder index),
then the chosen codec's body.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import build_compressor, register_compressor
from ..wire import HEADER_NBYTES, PayloadKind, as_bytes
from .base import Compressor, check_float

LEVEL_BYTE = 6
TYPICAL_ERROR = {"int1": 0.7, "int2": 0.5, "int4": 0.15, "int8": 0.01}
DEFAULT_LADDER = ("int1", "int2", "int4", "int8")


@register_compressor("auto")
class AdaptiveCompressor(Compressor):
    """Adaptive level per call (see the module docstring). ``target_rel_error``: the reconstruction
    error aimed at, relative to the activation's norm; ``ladder``: the levels, cheapest first, from
    int1, int2, int4, int8; ``group_size`` of the group quantizers."""

    variable_size: ClassVar[bool] = True
    wants_activation_norm: ClassVar[bool] = True
    # "none" has no residual to size (always the finest level); "delta" loses a skipped change for good
    needs_error_feedback: ClassVar[bool] = True

    def __init__(self, target_rel_error: float = 0.02, ladder: Any = DEFAULT_LADDER, group_size: int = 128) -> None:
        if isinstance(target_rel_error, bool) or not isinstance(target_rel_error, (int, float)) \
                or not 0 < target_rel_error < 1:
            raise ValueError(f"target_rel_error must be a number in (0, 1); got {target_rel_error!r}")
        if isinstance(ladder, str) or not isinstance(ladder, (list, tuple)) or not ladder \
                or any(level not in TYPICAL_ERROR for level in ladder) or len(set(ladder)) != len(ladder):
            raise ValueError(f"ladder must be a non-empty list of distinct levels from {', '.join(TYPICAL_ERROR)}; "
                             f"got {ladder!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer; got {group_size!r}")
        self.target_rel_error = float(target_rel_error)
        self.ladder = tuple(sorted(ladder, key=lambda level: -TYPICAL_ERROR[level]))
        self.group_size = group_size
        self.levels = [build_compressor(level if level in ("int1",) else {"name": level, "group_size": group_size})
                       for level in self.ladder]
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"target_rel_error": self.target_rel_error, "ladder": list(self.ladder), "group_size": self.group_size}

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The largest body (the finest level's)."""
        return max(level.body_nbytes(shape, dtype) for level in self.levels)

    def level_nbytes(self, level: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Payload bytes of ``level`` (0: skip)."""
        return HEADER_NBYTES + (0 if level == 0 else self.levels[level - 1].body_nbytes(shape, dtype))

    def choose(self, residual_norm: float, activation_norm: float) -> int:
        """The level for a residual of ``residual_norm`` on an activation of ``activation_norm``."""
        rel = residual_norm / activation_norm if activation_norm > 0 else (0.0 if residual_norm == 0 else float("inf"))
        if rel <= self.target_rel_error:
            return 0
        for i, name in enumerate(self.ladder):
            if TYPICAL_ERROR[name] * rel <= self.target_rel_error:
                return i + 1
        return len(self.ladder)

    def encode(self, x: torch.Tensor, state: dict[str, Any] | None = None) -> torch.Tensor:
        """Compress ``x`` at the level its size asks for (one host read of two norms)."""
        check_float(x, "compressor 'auto'")
        reference = (state or {}).get("activation_norm")
        residual_norm = float(torch.linalg.vector_norm(x.float())) if x.numel() else 0.0
        activation_norm = float(reference) if reference is not None else residual_norm
        level = self.choose(residual_norm, activation_norm) if reference is not None else len(self.ladder)
        header = self.device_cache.header(PayloadKind.COMPRESSED, x.dtype, self.fingerprint, x.numel(), x.device).clone()
        header[LEVEL_BYTE] = level
        if level == 0:
            return header
        return torch.cat([header, *(as_bytes(f) for f in self.levels[level - 1].encode_body(x, state))])

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError("AdaptiveCompressor writes its own header: use encode()")

    def decode(self, payload: torch.Tensor, shape: Any, dtype: torch.dtype) -> torch.Tensor:
        """Decode at the level in the header (one host read of that byte)."""
        level = int(payload[LEVEL_BYTE])
        if level > len(self.levels):
            raise ValueError(f"payload of 'auto' names level {level}; this ladder has {len(self.levels)}")
        shape = tuple(shape)
        if level == 0:
            return torch.zeros(shape, dtype=dtype, device=payload.device)
        return self.levels[level - 1].decode_body(payload[HEADER_NBYTES:], shape, dtype)

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("AdaptiveCompressor reads its level from the header: use decode()")

    @staticmethod
    def level_of(payload: torch.Tensor) -> int:
        """The level a payload was sent at (host read)."""
        return int(payload[LEVEL_BYTE])
