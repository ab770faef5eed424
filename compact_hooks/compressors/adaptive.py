"""``auto``: a level of a small ladder (skip / int1 / int2 / int4 / int8) per call, chosen by the sender
and written into the payload header (byte 6: 0 = skip, else 1 + ladder index). Two modes:

**Byte budget** (``target_ratio`` R: a call site spends ``raw / R`` bytes per call on average, or
``bytes_of`` a fixed codec: that codec's bytes): per step and link, the levels of all call sites are
allocated from the previous step's measured residuals (below int2's bytes: whole steps at int2 or
skipped; from a hook's second request the last step one level finer, paid for by the first steps;
:mod:`compact_hooks.budget`), so every rank knows every payload's size before the exchange
(one exchange, no lengths). A payload's header carries
the residual's norm and the error its level left (two bfloat16 in bytes 12..15) for the next allocation.

**Threshold** (``target_rel_error``, the default 0.02): with ``rel = ||residual|| / ||activation||`` and
each level's typical relative error ``c`` on a residual (measured on Gaussian and Student-t(3) data:
int1 0.6-0.78, int2 0.42-0.56, int4 0.10-0.20, int8 0.006-0.014; the constants below sit between), the
level sent is the cheapest whose expected error ``c * rel`` is within the target; when ``rel`` itself is
within it the call sends only a header ("skip": the base stays, error feedback carries the residual into
the next step). Payload sizes vary per call: :attr:`variable_size` tells the collectives to exchange
sizes first. The level is chosen on the device and read once per encode, or, through :meth:`plan`, once
for all the streams of a collective; a receiver knows the level from the payload's length (read from
the header only when two levels of a shape have the same size).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch

from ..registry import build_compressor, register_compressor
from ..wire import HEADER_NBYTES, PayloadKind, as_bytes
from .base import Compressor, check_float

LEVEL_BYTE = 6
NORMS_AT = slice(12, 16)  # budget mode: the residual's and the error's norms (two bfloat16) in the header
DEFAULT_TARGET = 0.02
TYPICAL_ERROR = {"int1": 0.7, "int2": 0.5, "int4": 0.15, "int8": 0.01}
DEFAULT_LADDER = ("int1", "int2", "int4", "int8")


@register_compressor("auto")
class AdaptiveCompressor(Compressor):
    """Adaptive level per call (see the module docstring). One of ``target_ratio`` (raw bytes per wire
    byte, a budget), ``bytes_of`` (a fixed codec whose bytes are the budget) or ``target_rel_error`` (the
    reconstruction error aimed at, relative to the activation's norm; the default); ``ladder``: the
    levels, from int1, int2, int4, int8; ``group_size`` of the group quantizers."""

    variable_size: ClassVar[bool] = True
    wants_activation_norm: ClassVar[bool] = True
    # "none" has no residual to size (always the finest level); "delta" loses a skipped change for good
    needs_error_feedback: ClassVar[bool] = True

    def __init__(self, target_rel_error: Optional[float] = None, ladder: Any = DEFAULT_LADDER, group_size: int = 128,
                 target_ratio: Optional[float] = None, bytes_of: Any = None) -> None:
        budgets = [name for name, v in (("target_rel_error", target_rel_error), ("target_ratio", target_ratio),
                                        ("bytes_of", bytes_of)) if v is not None]
        if len(budgets) > 1:
            raise ValueError(f"give one of target_rel_error (a threshold), target_ratio or bytes_of (a byte budget); "
                             f"got {', '.join(budgets)}")
        if target_rel_error is None and not budgets:
            target_rel_error = DEFAULT_TARGET
        if target_rel_error is not None and (isinstance(target_rel_error, bool)
                                             or not isinstance(target_rel_error, (int, float))
                                             or not 0 < target_rel_error < 1):
            raise ValueError(f"target_rel_error must be a number in (0, 1); got {target_rel_error!r}")
        if target_ratio is not None and (isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float))
                                         or not 1 <= target_ratio < math.inf):
            raise ValueError(f"target_ratio must be a finite number >= 1 (raw bytes per wire byte); got {target_ratio!r}")
        if isinstance(ladder, str) or not isinstance(ladder, (list, tuple)) or not ladder \
                or any(level not in TYPICAL_ERROR for level in ladder) or len(set(ladder)) != len(ladder):
            raise ValueError(f"ladder must be a non-empty list of distinct levels from {', '.join(TYPICAL_ERROR)}; "
                             f"got {ladder!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer; got {group_size!r}")
        self.target_rel_error = None if target_rel_error is None else float(target_rel_error)
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.bytes_of = None if bytes_of is None else build_compressor(bytes_of)
        if self.bytes_of is not None and (self.bytes_of.variable_size or self.bytes_of.name == "auto"):
            raise ValueError(f"bytes_of must name a fixed-size codec (e.g. \"int2\"); got {bytes_of!r}")
        self.ladder = tuple(sorted(ladder, key=lambda level: -TYPICAL_ERROR[level]))
        self.group_size = group_size
        self.levels = [build_compressor(level if level in ("int1",) else {"name": level, "group_size": group_size})
                       for level in self.ladder]
        self.typical_errors = tuple(TYPICAL_ERROR[level] for level in self.ladder)
        # budget mode: sizes every rank knows before the exchange (compact_hooks.budget), no activation norm
        self.budgeted = self.target_rel_error is None
        self.variable_size = not self.budgeted
        self.wants_activation_norm = not self.budgeted
        super().__init__()

    def params(self) -> dict[str, Any]:
        common = {"ladder": list(self.ladder), "group_size": self.group_size}
        if self.target_ratio is not None:
            return {"target_ratio": self.target_ratio, **common}
        if self.bytes_of is not None:
            return {"bytes_of": self.bytes_of.spec(), **common}
        return {"target_rel_error": self.target_rel_error, **common}

    # -- budget mode (compact_hooks.budget) ----------------------------------------------------
    def site_budget(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes one call of a stream of ``shape`` may spend on average (``dtype``: the activation's)."""
        if self.bytes_of is not None:  # what that codec sends for the (float32) residual
            return self.bytes_of.payload_nbytes(shape, torch.float32)
        return int(math.prod(shape) * torch.empty((), dtype=dtype).element_size() / self.target_ratio)

    def default_level(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The finest level within one call's budget (a call with no measurement yet)."""
        budget = self.site_budget(shape, dtype)
        fits = [level for level in range(len(self.levels) + 1)
                if self.level_nbytes(level, shape, torch.float32) <= budget]
        return max(fits, default=0)

    def make_planner(self) -> Any:
        """A :class:`~compact_hooks.budget.BudgetPlanner` for one session (budget mode), else ``None``."""
        if not self.budgeted:
            return None
        from ..budget import BudgetPlanner

        return BudgetPlanner(self)

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The largest body (the finest level's)."""
        return max(level.body_nbytes(shape, dtype) for level in self.levels)

    def level_nbytes(self, level: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Payload bytes of ``level`` (0: skip)."""
        return HEADER_NBYTES + (0 if level == 0 else self.levels[level - 1].body_nbytes(shape, dtype))

    def levels_on_device(self, residual_norms: torch.Tensor, activation_norms: torch.Tensor) -> torch.Tensor:
        """:meth:`choose` for 1-D tensors of norms, on their device (int64 levels; non-finite: the finest)."""
        target = self.target_rel_error
        rel = torch.where(activation_norms > 0, residual_norms / activation_norms,
                          torch.where(residual_norms == 0, 0.0, float("inf")))
        rel = torch.nan_to_num(rel, nan=float("inf"))
        # the ladder runs from the coarsest level: the ones too coarse for ``rel`` are a prefix
        too_coarse = sum((rel * TYPICAL_ERROR[name] > target).to(torch.int64) for name in self.ladder)
        return torch.where(rel <= target, 0, (too_coarse + 1).clamp_max(len(self.ladder)))

    def plan(self, states: list[dict[str, Any]], residuals: list[torch.Tensor],
             activations: list[torch.Tensor]) -> None:
        """Choose the levels of several streams of one collective with one host read: ``states[i]["level"]``
        is then what :meth:`encode` of ``residuals[i]`` (the residual of ``activations[i]``) sends."""
        if not states:
            return
        rn = torch.stack([torch.linalg.vector_norm(r, dtype=torch.float32) for r in residuals])
        an = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in activations])
        for state, level in zip(states, self.levels_on_device(rn, an).tolist()):
            state["level"] = level

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
        """Compress ``x`` at the level :meth:`plan` (or the budget) chose for it, else at the level its
        size asks for (one host read); without ``state["activation_norm"]``, at the finest level."""
        check_float(x, "compressor 'auto'")
        state = state if state is not None else {}
        if self.budgeted:
            level = state.pop("level", None)
            return self._encode_budgeted(x, self.default_level(tuple(x.shape), x.dtype) if level is None else level,
                                         state)
        level, reference = state.pop("level", None), state.get("activation_norm")
        if level is None and reference is not None and x.numel():
            residual_norm = torch.linalg.vector_norm(x, dtype=torch.float32).view(1)
            if not isinstance(reference, torch.Tensor):
                reference = torch.full((), float(reference), device=x.device)
            level = int(self.levels_on_device(residual_norm, reference.float().view(1)))
        elif level is None:
            level = 0 if reference is not None else len(self.ladder)
        header = self._header(x, level)
        if level == 0:
            return header
        return torch.cat([header, *(as_bytes(f) for f in self.levels[level - 1].encode_body(x, state))])

    def _header(self, x: torch.Tensor, level: int) -> torch.Tensor:
        header = self.device_cache.header(PayloadKind.COMPRESSED, x.dtype, self.fingerprint, x.numel(), x.device).clone()
        header[LEVEL_BYTE:LEVEL_BYTE + 1].fill_(level)  # a fill kernel (``header[i] = v`` syncs on a GPU)
        return header

    def _encode_budgeted(self, x: torch.Tensor, level: int, state: dict[str, Any]) -> torch.Tensor:
        """The header, carrying the norms of ``x`` and of the error ``level`` leaves (two bfloat16, in place of
        the element count, which receivers of a residual know), then the level's body."""
        if not 0 <= level <= len(self.levels):
            raise ValueError(f"level {level} is not on this ladder (0..{len(self.levels)})")
        shape = tuple(x.shape)
        r = torch.linalg.vector_norm(x, dtype=torch.float32)
        body = [as_bytes(f) for f in self.levels[level - 1].encode_body(x, state)] if level else []
        payload = torch.cat([self._header(x, level), *body])
        e = r
        decoded = None
        if level:  # decoded from the payload's own body: no second concatenation of the fields
            decoded = self.levels[level - 1].decode_body(payload[HEADER_NBYTES:], shape, torch.float32)
            e = torch.linalg.vector_norm(x.float() - decoded, dtype=torch.float32)
        payload[NORMS_AT].copy_(torch.stack([r, e]).to(torch.bfloat16).view(torch.uint8))
        # the sender's channel decodes this payload next (its base update): the same bytes, decoded once
        self.__dict__["_last_decoded"] = (payload, decoded)
        return payload

    @staticmethod
    def payload_stats(payload: torch.Tensor) -> torch.Tensor:
        """The norms of a budget-mode payload (residual and error, two bfloat16 as 4 bytes), a view."""
        return payload[NORMS_AT]

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError("AdaptiveCompressor writes its own header: use encode()")

    def decode(self, payload: torch.Tensor, shape: Any, dtype: torch.dtype) -> torch.Tensor:
        """Decode at the level the payload's length tells (the header's level byte, a host read, only
        where two levels of ``shape`` have the same size)."""
        shape = tuple(shape)
        last = self.__dict__.pop("_last_decoded", None)
        if last is not None and last[0] is payload and last[1] is not None and dtype == torch.float32 \
                and tuple(last[1].shape) == shape:
            return last[1]  # decoded by _encode_budgeted from these very bytes
        sizes = [self.level_nbytes(level, shape, dtype) for level in range(len(self.levels) + 1)]
        if sizes.count(payload.numel()) == 1:
            level = sizes.index(payload.numel())
        else:
            level = int(payload[LEVEL_BYTE])
        if level > len(self.levels):
            raise ValueError(f"payload of 'auto' names level {level}; this ladder has {len(self.levels)}")
        if level == 0:
            return torch.zeros(shape, dtype=dtype, device=payload.device)
        return self.levels[level - 1].decode_body(payload[HEADER_NBYTES:], shape, dtype)

    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("AdaptiveCompressor reads its level from the header: use decode()")

    @staticmethod
    def level_of(payload: torch.Tensor) -> int:
        """The level a payload was sent at (host read)."""
        return int(payload[LEVEL_BYTE])
