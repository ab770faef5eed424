"""Channel (one stream's residual and error-feedback state) and Session (all channels of a model).

A Channel is one directed stream: (call-site key, source rank, destination rank or ``None`` for
"every rank"). Sender and receivers of a stream hold the same ``base``; both update it from the
*decoded* payload with the same code, so the bases stay bit-identical::

    sender:   r = x - predict();  p = C.encode(r);  base = predict() + C.decode(p)
    receiver:                                        base = predict() + C.decode(p)

Modes: ``none`` compresses ``x`` itself; ``delta`` sends ``x_t - x_{t-1}`` (the sender keeps the true
previous ``x``: no error feedback, the error accumulates); ``ef`` (default) predicts ``base``;
``ef2`` predicts ``base + (base - previous base)``.

Full sends happen on the first ``warmup_steps`` exchanges of a key in each request (always the first
one), after a shape or dtype change of the key, and after a resync. A full send carries the tensor's
own bytes, or, with a ``warmup`` codec, that codec's lossy encoding of the tensor itself; then every
side sets its base to the *decoded* tensor, so error feedback corrects the warm-up error in the
following steps. Non-finite values never
enter a base: the sender zeroes them in the residual and sets a flag in the payload header; every
side updates its base from the clean residual, and receivers return NaN for a flagged tensor, so
the user's NaN stays visible for that step and later steps are normal again.

How a base is stored (a float dtype, 8 bits with group scales, offloaded to host memory) is in
:mod:`compact_hooks.bases`. With an 8-bit base a step returns ``predict() + C.decode(p)`` itself
(every side computes the same float32 value) and stores it rounded to 8 bits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from . import bases
from .bases import QUANT_KINDS, HostBase, OffloadWindow, QuantBase
from .bases import saturate_ as _saturate_
from .compressors.base import Compressor
from .config import CompactConfig, load_config
from .finite import clean as _clean
from .finite import fit as _fit
from .finite import poison_if as _poison_if
from .kernels import channel_decode, channel_encode, check_setting, fused_base, use_fused
from .registry import build_compressor
from .stats import Stats
from .wire import FLAGS_BYTE, decode_raw, raw_nbytes

MODES = ("none", "delta", "ef", "ef2")
FP16_MAX = 65504.0
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASE_DEVICES = ("input", "cpu")  # "input": the tensor's own device; "cpu": host memory (compact_hooks.bases)


@dataclass
class Channel:
    """Residual state of one stream. ``encode`` runs on the sender, ``decode`` on receivers."""

    compressor: Compressor
    mode: str
    base_dtype: Union[torch.dtype, str, None]  # None: the input's dtype; "int8" / "fp8": 8 bits (bases.py)
    warmup: Optional[Compressor] = None  # full sends: None = the tensor's own bytes
    base: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None  # ef2
    previous_x: Optional[torch.Tensor] = None  # delta, sender side
    codec_state: dict[str, Any] = field(default_factory=dict)
    nonfinite: Optional[torch.Tensor] = None  # device counter, read by stats
    kernels: str = "auto"  # compressed steps on the fused kernels? see compact_hooks.kernels.dispatch
    offload: Optional[OffloadWindow] = None  # base_device "cpu": bases live on the host between steps
    prefetched: Optional[tuple[dict[str, Any], list[Any]]] = None  # device copies on their way (offload)
    spare: Optional[dict[str, Any]] = None  # host buffers of the base while it is on the device (offload)
    resident_bytes: int = 0  # device bytes the offload window counts for this channel

    # -- shared ----------------------------------------------------------------------------------
    def _store(self, t: torch.Tensor, input_dtype: torch.dtype, owned: bool = True) -> Union[torch.Tensor, QuantBase]:
        """``t`` in the base dtype (``input_dtype`` when it is "input"), saturated to its finite range
        (a base never overflows to inf); ``owned``: ``t`` is a temporary that may be reused."""
        if isinstance(self.base_dtype, str):
            return bases.quantize(_saturate_(t.float() if owned or t.dtype != torch.float32 else t.clone()),
                                  self.base_dtype)
        dtype = self.base_dtype or input_dtype
        if t.dtype == dtype and not owned:
            t = t.clone()
        return _saturate_(t.to(dtype))

    def _predict(self) -> torch.Tensor:
        assert self.base is not None
        pred = bases.load(self.base)
        if self.mode == "ef2" and self.velocity is not None:
            pred = pred + bases.load(self.velocity)
        return pred

    def _set_full(self, x: torch.Tensor) -> None:
        clean, flag = _clean(x, owned=False)
        self._count(flag)
        if self.mode == "none":
            return
        self.base = self._store(clean, x.dtype, owned=clean is not x)
        self.velocity = None
        self.codec_state.clear()

    def _fused(self, device: torch.device, shape: tuple[int, ...]) -> bool:
        """Whether a compressed step runs on the fused kernels (the same bytes and bases as the torch code)."""
        return (self.kernels != "torch" and fused_base(self.base_dtype, self.offload is not None)
                and use_fused(self.kernels, self.compressor, device, tuple(shape)))

    def _count(self, flag: torch.Tensor) -> None:
        flag = flag.to(torch.int64)
        self.nonfinite = flag if self.nonfinite is None else self.nonfinite + flag

    def _update(self, decoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Apply a decoded residual to the base; return the reconstruction in ``dtype``."""
        value = self._predict() + decoded.float()
        stored = self._store(value, dtype)
        if self.mode == "ef2":
            self.velocity = self._store(bases.load(stored) - bases.load(self.base), dtype)
        self.base = stored
        return _fit(stored if isinstance(stored, torch.Tensor) else value, dtype)  # 8-bit: _store saturated value in place

    # -- sender ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x``; return ``(payload, reconstruction the receivers will hold)`` (see :meth:`_encode`)."""
        if self.offload is None:
            return self._encode(x, full)
        self.offload.bring(self, x.device)
        try:
            return self._encode(x, full)
        finally:
            self.offload.evict(self)

    def _encode(self, x: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x``; return ``(payload, reconstruction the receivers will hold)``.

        Non-finite values are zeroed before encoding and flagged in the header; receivers then
        return NaN for the whole tensor (never a silently finite wrong value) while every base
        stays finite, so the next step is back to normal.
        """
        if full and self.warmup is not None:
            return self._encode_warmup(x)
        if full:
            payload = self.compressor.encode_raw(x.contiguous())
            self._set_full(x)
            if self.mode == "delta":
                self.previous_x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            return payload, x
        if self._fused(x.device, x.shape):
            return channel_encode(self, x)
        if self.mode == "none":
            clean, flag = _clean(x, owned=False)
            payload = self.compressor.encode(clean, self.codec_state)
            recon = self.compressor.decode(payload, x.shape, x.dtype)
        else:
            if self.mode == "delta":
                residual = x.float() - self.previous_x.float()
                self.previous_x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            else:
                planned = self.codec_state.pop("residual", None)  # see residual()
                residual = planned[1] if planned is not None and planned[0] is x else x.float() - self._predict()
            if self.compressor.wants_activation_norm:
                self.codec_state["activation_norm"] = torch.linalg.vector_norm(x, dtype=torch.float32)
            clean, flag = _clean(residual, owned=True)
            payload = self.compressor.encode(clean, self.codec_state)
            recon = self._update(self.compressor.decode(payload, clean.shape, clean.dtype), x.dtype)
        payload[FLAGS_BYTE] = flag.to(torch.uint8)
        self._count(flag)
        return payload, _poison_if(recon, flag)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 residual (``ef``/``ef2``) the next compressed :meth:`encode` of ``x`` sends, kept
        for it: a codec that sizes each call (``auto``) plans every stream of a collective first."""
        if self.offload is not None:
            self.offload.bring(self, x.device)  # stays on the device until the encode that follows
        r = x.float() - self._predict()
        self.codec_state["residual"] = (x, r)
        return r

    def _encode_warmup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A lossy full send: the warm-up codec encodes ``x`` itself; the base is the decoded tensor."""
        clean, flag = _clean(x, owned=False)
        payload = self.warmup.encode(clean)
        payload[FLAGS_BYTE] = flag.to(torch.uint8)
        decoded = self._set_warmup_base(payload, tuple(x.shape), x.dtype, flag)
        if self.mode == "delta":
            self.previous_x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return payload, _poison_if(decoded, flag)

    def _set_warmup_base(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                         flag: torch.Tensor) -> torch.Tensor:
        decoded = self.warmup.decode(payload, shape, dtype)
        self._count(flag)
        if self.mode != "none":
            self.base = self._store(decoded, dtype, owned=False)
            self.velocity = None
            self.codec_state.clear()
        return decoded

    # -- receiver --------------------------------------------------------------------------------
    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, full: bool) -> torch.Tensor:
        """Decode a payload of this stream; return the reconstruction."""
        if self.offload is None:
            return self._decode(payload, shape, dtype, full)
        self.offload.bring(self, payload.device)
        try:
            return self._decode(payload, shape, dtype, full)
        finally:
            self.offload.evict(self)

    def _decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, full: bool) -> torch.Tensor:
        if full and self.warmup is not None:
            flag = payload[FLAGS_BYTE] != 0
            return _poison_if(self._set_warmup_base(payload, shape, dtype, flag), flag)
        if full:
            x = decode_raw(payload, shape, dtype)
            self._set_full(x)
            return x
        if self._fused(payload.device, shape):
            return channel_decode(self, payload, shape, dtype)
        flag = payload[FLAGS_BYTE] != 0
        self._count(flag)
        if self.mode == "none":
            return _poison_if(self.compressor.decode(payload, shape, dtype), flag)
        decoded = self.compressor.decode(payload, shape, torch.float32)
        return _poison_if(self._update(decoded, dtype), flag)

    # -- introspection ---------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Device bytes: base and velocity (unless offloaded to the host), prefetched copies, previous
        x and codec state."""
        held = [v for v in (self.base, self.velocity) if not isinstance(v, HostBase)]
        if self.prefetched is not None:
            held += list(self.prefetched[0].values())
        tensors = [self.previous_x, *self.codec_state.values()]
        return sum(bases.nbytes(v) for v in held) + sum(t.numel() * t.element_size() for t in tensors
                                                        if isinstance(t, torch.Tensor))

    def host_memory_bytes(self) -> int:
        """Bytes of the base and velocity held in host memory (``base_device`` "cpu")."""
        return sum(bases.nbytes(v) for v in (self.base, self.velocity) if isinstance(v, HostBase))

    def digest(self) -> str:
        """A hash of the base (and velocity): equal on every rank that holds this stream."""
        h = hashlib.sha1()
        for value in (self.base, self.velocity):
            for t in bases.tensors(value):
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def checksum(self) -> torch.Tensor:
        """A cheap position-weighted integer checksum of the base (and velocity), on its (compute) device."""
        device = self.base.device if self.base is not None else torch.device("cpu")
        total = torch.zeros((), dtype=torch.int64, device=device)
        for value in (self.base, self.velocity):
            for t in bases.tensors(value):
                size = t.element_size()
                bits = t.contiguous().view(-1)
                bits = bits.view(torch.int16 if size == 2 else torch.int32) if size in (2, 4) else bits.view(torch.uint8)
                weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
                total = total + (bits.to(torch.int64) * weights).sum().to(device)
        return total

    def corrupt_for_testing(self, scale: float = 1.0) -> None:
        """Perturb the base (tests of divergence detection only)."""
        if self.base is not None:
            self.base = bases.perturbed(self.base, scale)


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
                 base_dtype: str = "input", stats: Optional[Stats] = None, verify_every: int = 0,
                 timeout_s: Optional[float] = None, warmup_compressor: Optional[Compressor] = None,
                 kernels: str = "auto", base_device: str = "input") -> None:
        if mode not in MODES:
            raise ValueError(f"residual mode must be one of {', '.join(MODES)}; got {mode!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        if base_dtype != "input" and base_dtype not in BASE_DTYPES and base_dtype not in QUANT_KINDS:
            raise ValueError(f"base_dtype must be 'input' or one of {', '.join([*BASE_DTYPES, *QUANT_KINDS])}; "
                             f"got {base_dtype!r}")
        if base_device not in BASE_DEVICES:
            raise ValueError(f"base_device must be one of {', '.join(BASE_DEVICES)}; got {base_device!r}")
        if verify_every < 0:
            raise ValueError(f"verify_every must be >= 0; got {verify_every}")
        self.compressor = compressor
        self.warmup_compressor = warmup_compressor
        self.mode = mode
        self.verify_every = verify_every
        self.timeout_s = timeout_s
        self.warmup_steps = warmup_steps
        self.base_dtype = None if base_dtype == "input" else BASE_DTYPES.get(base_dtype, base_dtype)
        self.base_device = base_device
        self.offload = OffloadWindow() if base_device == "cpu" else None
        self.kernels = check_setting(kernels)  # the payloads are the same either way: ranks may differ
        self.stats = stats if stats is not None else Stats()
        # auto with a byte budget: the levels of each step, known to every rank (compact_hooks.budget)
        self.budget = getattr(compressor, "make_planner", lambda: None)()
        self.request = 0
        self.step = 0
        self.keys: dict[str, KeyState] = {}  # stream name (see stream()) -> its state
        # (key, group ranks) -> stream name; kept across requests, so a key keeps its name
        self.streams: dict[tuple[str, tuple[int, ...]], str] = {}
        self.auto_key_counts: dict[tuple[str, tuple[int, ...]], int] = {}
        self.checked_groups: set[tuple[int, ...]] = set()
        # (group ranks, key) -> (op, shape, dtype) every rank of the group agreed on; kept across
        # requests, so the check costs one small collective per call site, not one per request
        self.agreed_tensors: dict[tuple[tuple[int, ...], str], tuple[str, tuple[int, ...], torch.dtype]] = {}
        self.verified_headers: set[tuple[tuple[int, ...], str]] = set()

    @classmethod
    def from_config(cls, config: Any = None) -> "Session":
        cfg: CompactConfig = load_config(config)
        return cls.from_settings(cfg, Stats(enabled=cfg.stats.enabled, error_every=cfg.stats.error_every))

    @classmethod
    def from_settings(cls, cfg: CompactConfig, stats: Stats) -> "Session":
        """A session with ``cfg``'s codec settings that counts into ``stats`` (shared by a hook's sessions)."""
        warmup = build_compressor(cfg.warmup_compressor) if cfg.warmup_compressor is not None else None
        return cls(cfg.build_compressor(), cfg.residual, cfg.warmup_steps, cfg.base_dtype, stats,
                   cfg.verify_every, cfg.timeout_s, warmup, cfg.kernels, cfg.base_device)

    def settings(self) -> dict[str, Any]:
        """What every rank of a group must agree on."""
        return {"compressor": self.compressor.spec(), "residual": self.mode, "warmup_steps": self.warmup_steps,
                "warmup_compressor": self.warmup_compressor.spec() if self.warmup_compressor else None,
                "base_dtype": str(self.base_dtype) if self.base_dtype else "input", "base_device": self.base_device,
                # both add collectives (base checksums, exact references): a mismatch would pair
                # unrelated collectives across ranks
                "verify_every": self.verify_every,
                "error_every": self.stats.error_every if self.stats.enabled else 0}

    # -- request and step ------------------------------------------------------------------------
    def begin_request(self) -> None:
        """Start a new request: every channel is dropped, the next exchanges are full sends."""
        if self.step or self.keys:
            self.stats.end_step(self.request, self.step)
        self.request += 1
        self.step = 0
        self._drop_keys()
        if self.offload is not None:
            self.offload.begin_request()
        self.auto_key_counts.clear()

    def next_step(self) -> None:
        """The current step ended."""
        self.stats.end_step(self.request, self.step)
        self.step += 1
        self.auto_key_counts.clear()
        if self.offload is not None:
            self.offload.end_step()

    def _drop_keys(self, key: Optional[str] = None) -> None:
        """Forget channels (all, or one key's), keeping their non-finite counts in the stats."""
        for name in [key] if key is not None else list(self.keys):
            state = self.keys.pop(name, None)
            if state is not None and self.offload is not None:
                for ch in state.channels.values():
                    self.offload.forget(ch)
            if state is not None:
                self.stats.nonfinite += sum(int(ch.nonfinite) for ch in state.channels.values()
                                            if ch.nonfinite is not None)

    def nonfinite(self) -> int:
        """Payloads with NaN/Inf this rank sent or received (reads device counters: a sync)."""
        live = sum(int(ch.nonfinite) for st in self.keys.values() for ch in st.channels.values()
                   if ch.nonfinite is not None)
        return self.stats.nonfinite + live

    def reset(self) -> None:
        """Drop all channels and counters."""
        self.keys.clear()
        self.streams.clear()
        self.agreed_tensors.clear()
        self.verified_headers.clear()
        self.auto_key_counts.clear()
        if self.budget is not None:
            self.budget.clear()
        self.stats.clear()
        self.request = self.step = 0

    def auto_key(self, op: str, ranks: tuple[int, ...] = ()) -> str:
        """A key for a call without one: the op and its index among this step's keyless calls of
        ``op`` on the group of ``ranks`` (counted per group: a rank's calls on another group do not
        shift the numbers its peers that are not in that group see)."""
        n = self.auto_key_counts.get((op, ranks), 0)
        self.auto_key_counts[(op, ranks)] = n + 1
        return f"{op}#{n}"

    def stream(self, key: str, ranks: tuple[int, ...]) -> str:
        """The name of the streams of call site ``key`` on the group of global ``ranks``: the key
        itself on the first group this session uses it on, ``key@0,1,2`` (the group's ranks) on any
        other. One key on two groups (two models with the same module names) thus keeps separate
        bases, warm-up and verification per group, as the groups' members differ."""
        name = self.streams.get((key, ranks))
        if name is None:
            taken = set(self.streams.values())
            name = key if key not in taken else f"{key}@{','.join(map(str, ranks))}"
            while name in taken:  # a user key that happens to read like a stream name
                name += "'"
            self.streams[(key, ranks)] = name
        return name

    # -- channels --------------------------------------------------------------------------------
    def prepare(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Start an exchange of ``key``; return whether it is a full send. A new shape or dtype resets the key."""
        state = self.keys.get(key)
        if state is None or state.shape != tuple(shape) or state.dtype != dtype:
            self._drop_keys(key)
            state = self.keys[key] = KeyState(tuple(shape), dtype)
        full = state.exchanges < self.warmup_steps or state.resync or state.exchanges == 0
        state.exchanges += 1
        state.resync = False
        if full:
            for channel in state.channels.values():
                channel.codec_state.clear()
        if self.offload is not None:  # prefetch the next key's bases (the call order of the last step)
            self.offload.started(key, lambda k: self.keys[k].channels.values() if k in self.keys else ())
        return full

    def channel(self, key: str, src: int, dst: Optional[int] = None) -> Channel:
        """The channel of stream ``key`` from global rank ``src`` to ``dst`` (``None``: to every rank)."""
        state = self.keys[key]
        ch = state.channels.get((src, dst))
        if ch is None:
            ch = state.channels[(src, dst)] = Channel(self.compressor, self.mode, self.base_dtype, self.warmup_compressor,
                                                          kernels=self.kernels, offload=self.offload)
        return ch

    @property
    def full_codec(self) -> Compressor:
        """The codec whose fingerprint heads a full send (the warm-up codec, if one is set)."""
        return self.warmup_compressor or self.compressor

    def is_lossless(self, dtype: torch.dtype) -> bool:
        return self.compressor.is_lossless(dtype)

    def request_resync(self, key: str) -> None:
        """Make the next exchange of ``key`` a full send, on every group this session uses it on
        (call it on every rank that calls the key)."""
        for name in {n for (k, _), n in self.streams.items() if k == key} or {key}:
            self.resync_stream(name)

    def resync_stream(self, name: str) -> None:
        """Make the next exchange of one stream (a name of :meth:`stream`) a full send."""
        if name in self.keys:
            self.keys[name].resync = True
            self.stats.resyncs += 1

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, full: bool) -> int:
        """Bytes of one payload of a stream of ``shape``/``dtype``."""
        if full and self.warmup_compressor is not None:
            return self.warmup_compressor.payload_nbytes(shape, dtype)
        if full:
            return raw_nbytes(int(torch.Size(shape).numel()), dtype)
        if self.mode != "none" and not self.is_lossless(dtype):
            return self.compressor.payload_nbytes(shape, torch.float32)
        return self.compressor.payload_nbytes(shape, dtype)

    def memory_bytes(self) -> int:
        """Device bytes held by every channel's base, velocity and codec state (8-bit bases: codes and
        scales; offloaded bases: only the device window, see :meth:`host_memory_bytes`)."""
        return sum(ch.memory_bytes() for st in self.keys.values() for ch in st.channels.values())

    def host_memory_bytes(self) -> int:
        """Bytes of bases held in host memory (``base_device`` "cpu"; 0 otherwise)."""
        return sum(ch.host_memory_bytes() for st in self.keys.values() for ch in st.channels.values())

    def window_peak_bytes(self) -> int:
        """The most device bytes the offload window held at once so far (0 without offloading)."""
        return self.offload.peak_bytes if self.offload is not None else 0

    def base_digests(self) -> dict[str, str]:
        """``"key|src->dst": hash`` of every channel base; a stream's entry is equal on all its ranks.
        A key this session uses on several groups is written ``key@0,1|src->dst`` for each group."""
        groups: dict[str, int] = {}
        for key, _ in self.streams:
            groups[key] = groups.get(key, 0) + 1
        shown = {name: key if groups[key] == 1 else f"{key}@{','.join(map(str, ranks))}"
                 for (key, ranks), name in self.streams.items()}
        out = {}
        for name, st in self.keys.items():
            for (src, dst), ch in st.channels.items():
                if ch.base is not None:
                    out[f"{shown.get(name, name)}|{src}->{'*' if dst is None else dst}"] = ch.digest()
        return out
