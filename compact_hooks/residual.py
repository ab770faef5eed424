"""Channel (one stream's residual and error-feedback state) and Session (all channels of a model).

A Channel is one directed stream: (call-site key, source rank, destination rank or ``None`` for
"every rank"). Sender and receivers of a stream hold the same ``base``; both update it from the
*decoded* payload with the same code, so the bases stay bit-identical::

    sender:   r = x - predict();  p = C.encode(r);  base = predict() + C.decode(p)
    receiver:                                        base = predict() + C.decode(p)

Modes: ``none`` compresses ``x`` itself; ``delta`` sends ``x_t - x_{t-1}`` (the sender keeps the true
previous ``x``: no error feedback, the error accumulates); ``ef`` (default) predicts ``base``;
``ef2`` predicts ``base + (base - previous base)``.

Full sends (the tensor's own bytes) happen on the first ``warmup_steps`` exchanges of a key in each
request, after a shape or dtype change of the key, and after a resync. Non-finite decoded values
never enter a base: where ``predict() + decoded`` is not finite, the base keeps ``predict()``
(on every side alike), while the returned reconstruction still shows the NaN/Inf.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .compressors.base import Compressor
from .config import CompactConfig, load_config
from .stats import Stats
from .wire import decode_raw, encode_raw, raw_nbytes

MODES = ("none", "delta", "ef", "ef2")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Channel:
    """Residual state of one stream. ``encode`` runs on the sender, ``decode`` on receivers."""

    compressor: Compressor
    mode: str
    base_dtype: Optional[torch.dtype]  # None: the input's dtype
    base: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None  # ef2
    previous_x: Optional[torch.Tensor] = None  # delta, sender side
    codec_state: dict[str, Any] = field(default_factory=dict)
    nonfinite: Optional[torch.Tensor] = None  # device counter, read by stats

    # -- shared ----------------------------------------------------------------------------------
    def _store(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(self.base_dtype or like.dtype)

    def _predict(self) -> torch.Tensor:
        assert self.base is not None
        pred = self.base.float()
        if self.mode == "ef2" and self.velocity is not None:
            pred = pred + self.velocity.float()
        return pred

    def _set_full(self, x: torch.Tensor) -> None:
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        self._count_nonfinite(finite)
        if self.mode == "none":
            self.base = None
            return
        self.base = self._store(clean, x)
        self.velocity = None
        self.codec_state.clear()

    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        bad = (~finite).sum()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad

    def _update(self, decoded: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Apply a decoded residual to the base; return the reconstruction in ``like``'s dtype."""
        pred = self._predict()
        new = pred + decoded.float()
        finite = torch.isfinite(new)
        self._count_nonfinite(finite)
        kept = torch.where(finite, new, pred)
        stored = self._store(kept, like)
        if self.mode == "ef2":
            self.velocity = self._store(stored.float() - self.base.float(), like)
        self.base = stored
        return torch.where(finite, stored.to(like.dtype), new.to(like.dtype))

    # -- sender ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x``; return ``(payload, reconstruction the receivers will hold)``."""
        if full:
            payload = encode_raw(x.contiguous(), self.compressor.fingerprint)
            self._set_full(x)
            if self.mode == "delta":
                self.previous_x = x.clone()
            return payload, x
        if self.mode == "none":
            payload = self.compressor.encode(x, self.codec_state)
            return payload, self.compressor.decode(payload, x.shape, x.dtype)
        if self.mode == "delta":
            residual = x.float() - self.previous_x.float()
            self.previous_x = x.clone()
        else:
            residual = x.float() - self._predict()
        payload = self.compressor.encode(residual, self.codec_state)
        decoded = self.compressor.decode(payload, residual.shape, residual.dtype)
        return payload, self._update(decoded, x)

    # -- receiver --------------------------------------------------------------------------------
    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, full: bool) -> torch.Tensor:
        """Decode a payload of this stream; return the reconstruction."""
        if full:
            x = decode_raw(payload, shape, dtype)
            self._set_full(x)
            return x
        if self.mode == "none":
            return self.compressor.decode(payload, shape, dtype)
        decoded = self.compressor.decode(payload, shape, torch.float32)
        return self._update(decoded, torch.empty((), dtype=dtype))

    # -- introspection ---------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        tensors = [self.base, self.velocity, self.previous_x, *self.codec_state.values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def digest(self) -> str:
        """A hash of the base (and velocity): equal on every rank that holds this stream."""
        h = hashlib.sha1()
        for t in (self.base, self.velocity):
            if t is not None:
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def corrupt_for_testing(self, scale: float = 1.0) -> None:
        """Perturb the base (tests of divergence detection only)."""
        if self.base is not None:
            self.base = self.base + scale * torch.ones_like(self.base)


@dataclass
class KeyState:
    """Bookkeeping of one call site: its shape and dtype, exchanges so far, pending resync."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    exchanges: int = 0
    resync: bool = False
    channels: dict[tuple[int, Optional[int]], Channel] = field(default_factory=dict)


class Session:
    """All channels of one model, the current request and step, and the stats.

    The integration (or the user) calls :meth:`begin_request` when a pipeline call starts and
    :meth:`next_step` after each denoising step.
    """

    def __init__(self, compressor: Compressor, mode: str = "ef", warmup_steps: int = 1,
                 base_dtype: str = "input", stats: Optional[Stats] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"residual mode must be one of {', '.join(MODES)}; got {mode!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        if base_dtype != "input" and base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be 'input' or one of {', '.join(BASE_DTYPES)}; got {base_dtype!r}")
        self.compressor = compressor
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.base_dtype = None if base_dtype == "input" else BASE_DTYPES[base_dtype]
        self.stats = stats if stats is not None else Stats()
        self.request = 0
        self.step = 0
        self.keys: dict[str, KeyState] = {}
        self.auto_key_counts: dict[str, int] = {}
        self.checked_groups: set[tuple[int, ...]] = set()

    @classmethod
    def from_config(cls, config: Any = None) -> "Session":
        cfg: CompactConfig = load_config(config)
        return cls(cfg.build_compressor(), cfg.residual, cfg.warmup_steps, cfg.base_dtype,
                   Stats(enabled=cfg.stats.enabled, error_every=cfg.stats.error_every))

    def settings(self) -> dict[str, Any]:
        """What every rank of a group must agree on."""
        return {"compressor": self.compressor.spec(), "residual": self.mode, "warmup_steps": self.warmup_steps,
                "base_dtype": str(self.base_dtype) if self.base_dtype else "input"}

    # -- request and step ------------------------------------------------------------------------
    def begin_request(self) -> None:
        """Start a new request: every channel is dropped, the next exchanges are full sends."""
        if self.step or self.keys:
            self.stats.end_step(self.request, self.step)
        self.request += 1
        self.step = 0
        self.keys.clear()
        self.auto_key_counts.clear()

    def next_step(self) -> None:
        """The current step ended."""
        self.stats.end_step(self.request, self.step)
        self.step += 1
        self.auto_key_counts.clear()

    def reset(self) -> None:
        """Drop all channels and counters."""
        self.keys.clear()
        self.auto_key_counts.clear()
        self.stats.clear()
        self.request = self.step = 0

    def auto_key(self, op: str) -> str:
        """A key for a call without one: the op and its index among this step's keyless calls."""
        n = self.auto_key_counts.get(op, 0)
        self.auto_key_counts[op] = n + 1
        return f"{op}#{n}"

    # -- channels --------------------------------------------------------------------------------
    def prepare(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Start an exchange of ``key``; return whether it is a full send. A new shape or dtype resets the key."""
        state = self.keys.get(key)
        if state is None or state.shape != tuple(shape) or state.dtype != dtype:
            state = self.keys[key] = KeyState(tuple(shape), dtype)
        full = state.exchanges < self.warmup_steps or state.resync or state.exchanges == 0
        state.exchanges += 1
        state.resync = False
        if full:
            for channel in state.channels.values():
                channel.codec_state.clear()
        return full

    def channel(self, key: str, src: int, dst: Optional[int] = None) -> Channel:
        """The channel of stream ``key`` from global rank ``src`` to ``dst`` (``None``: to every rank)."""
        state = self.keys[key]
        ch = state.channels.get((src, dst))
        if ch is None:
            ch = state.channels[(src, dst)] = Channel(self.compressor, self.mode, self.base_dtype)
        return ch

    def is_lossless(self, dtype: torch.dtype) -> bool:
        return self.compressor.is_lossless(dtype)

    def request_resync(self, key: str) -> None:
        """Make the next exchange of ``key`` a full send (on every rank that calls it)."""
        if key in self.keys:
            self.keys[key].resync = True
            self.stats.key(key, "?").resyncs += 1

    def full_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return raw_nbytes(int(torch.Size(shape).numel()), dtype)

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, full: bool) -> int:
        """Bytes of one payload of a stream of ``shape``/``dtype``."""
        if full:
            return self.full_nbytes(shape, dtype)
        if self.mode != "none" and not self.is_lossless(dtype):
            return self.compressor.payload_nbytes(shape, torch.float32)
        return self.compressor.payload_nbytes(shape, dtype)

    def memory_bytes(self) -> int:
        """Bytes held by every channel's base, velocity and codec state."""
        return sum(ch.memory_bytes() for st in self.keys.values() for ch in st.channels.values())

    def base_digests(self) -> dict[str, str]:
        """``"key|src->dst": hash`` of every channel base; a stream's entry is equal on all its ranks."""
        out = {}
        for key, st in self.keys.items():
            for (src, dst), ch in st.channels.items():
                if ch.base is not None:
                    out[f"{key}|{src}->{'*' if dst is None else dst}"] = ch.digest()
        return out
