"""How a channel stores its base: a float tensor, 8 bits with group scales, and offloaded to the host.

* **8-bit bases** (``base_dtype`` ``"int8"`` or ``"fp8"``): :class:`QuantBase` holds the base as codes
  of groups of :data:`GROUP` consecutive values (the tensor flattened, the last group zero-padded)
  and one float32 scale per group: ``int8`` rounds ``x / (amax / 127)`` to the nearest integer,
  ``fp8`` casts ``x / (amax / 448)`` to float8 e4m3 (``torch.float8_e4m3fn``, round to nearest even).
  Sender and receivers quantize the same float32 value with the same code, so the stored bases stay
  bit-identical; the rounding is part of the next residual (``x - dequantize(base)``), so error
  feedback sends it with the next step. 1 byte + 4/64 per value: 0.53x of a bf16 base.
* **Offloaded bases** (``base_device`` ``"cpu"``): between calls a channel's base (and ef2 velocity)
  is a :class:`HostBase`, a copy in host memory (pinned when CUDA is available). An
  :class:`OffloadWindow` per session learns the call order of a step (the keys of
  ``Session.prepare``), and when a key starts it prefetches the bases of the next key to the
  device on a side CUDA stream; after a channel's update its base is written back on the same
  stream (in order, so a later prefetch reads the new copy). The device thus holds the current
  and the next key's bases. On the CPU the copies are plain (synchronous) copies: the same code
  path, the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

QUANT_KINDS = ("int8", "fp8")
GROUP = 64  # values per scale of an 8-bit base
FP8_MAX = 448.0  # largest finite float8 e4m3fn
SCALE_NBYTES = 4  # float32 group scales
PREFETCH_AHEAD = 1  # keys prefetched ahead of the current one


def saturate_(t: torch.Tensor) -> torch.Tensor:
    """In place: infinities (a cast or a sum beyond the dtype's range) become its largest finite value."""
    limit = torch.finfo(t.dtype).max
    return t.nan_to_num_(nan=0.0, posinf=limit, neginf=-limit)


@dataclass
class QuantBase:
    """A base in 8 bits: ``codes [groups, GROUP]`` (int8, or float8 e4m3 bits as uint8) and float32
    ``scales [groups]`` of a tensor of ``shape``."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    kind: str

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scales)

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class HostBase:
    """A base (tensor or :class:`QuantBase`) held in host memory for a channel computed on
    ``device``; ``ready`` is the CUDA event of its write-back (``None``: complete)."""

    stored: Union[torch.Tensor, QuantBase]
    device: torch.device
    ready: Optional[Any] = None

    def wait(self) -> Union[torch.Tensor, QuantBase]:
        """The host copy, once its write-back finished (a host sync on CUDA)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.stored


Stored = Union[torch.Tensor, QuantBase, HostBase]


def quant_nbytes(numel: int) -> int:
    """Bytes of an 8-bit base of ``numel`` values (codes, padding and scales)."""
    groups = -(-numel // GROUP)
    return groups * GROUP + groups * SCALE_NBYTES


def quantize(t: torch.Tensor, kind: str) -> QuantBase:
    """``t`` (finite) as an 8-bit base of ``kind``; deterministic, so every side gets the same bytes."""
    flat = t.detach().reshape(-1).float()
    pad = (-flat.numel()) % GROUP
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, GROUP)
    amax = groups.abs().amax(1)
    top = 127.0 if kind == "int8" else FP8_MAX
    scales = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = groups / scales[:, None]
    if kind == "int8":
        codes = scaled.round_().clamp_(-127.0, 127.0).to(torch.int8)
    else:
        codes = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return QuantBase(codes, scales, tuple(t.shape), kind)


def dequantize(q: QuantBase) -> torch.Tensor:
    """The float32 values of an 8-bit base."""
    codes = q.codes if q.kind == "int8" else q.codes.view(torch.float8_e4m3fn)
    values = saturate_(codes.float().mul_(q.scales[:, None]))  # 127 * (amax / 127) may round past float32's max
    return values.view(-1)[: q.numel()].view(q.shape)


def load(stored: Union[torch.Tensor, QuantBase]) -> torch.Tensor:
    """A device-resident base as float32 (a tensor as is, converted)."""
    return dequantize(stored) if isinstance(stored, QuantBase) else stored.float()


def tensors(stored: Optional[Stored]) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a base (after its write-back, for a host copy)."""
    if stored is None:
        return ()
    if isinstance(stored, HostBase):
        return tensors(stored.wait())
    return stored.tensors() if isinstance(stored, QuantBase) else (stored,)


def nbytes(stored: Optional[Stored]) -> int:
    """Bytes a base holds (no sync: sizes only)."""
    if isinstance(stored, HostBase):
        stored = stored.stored
    if stored is None:
        return 0
    parts = stored.tensors() if isinstance(stored, QuantBase) else (stored,)
    return sum(t.numel() * t.element_size() for t in parts)


def perturbed(stored: Stored, scale: float) -> Stored:
    """A base with ``scale`` added to every value (tests of divergence detection only)."""
    if isinstance(stored, HostBase):
        return HostBase(perturbed(stored.wait(), scale), stored.device)
    if isinstance(stored, QuantBase):
        return quantize(dequantize(stored) + scale, stored.kind)
    return stored + scale * torch.ones_like(stored)


def _map(stored: Union[torch.Tensor, QuantBase], fn: Callable[[torch.Tensor], torch.Tensor]) -> Union[torch.Tensor, QuantBase]:
    if isinstance(stored, QuantBase):
        return QuantBase(fn(stored.codes), fn(stored.scales), stored.shape, stored.kind)
    return fn(stored)


@dataclass
class OffloadWindow:
    """The device window of a session's offloaded bases: call order, prefetches, write-backs and
    the device bytes they hold (``device_bytes`` now, ``peak_bytes`` the most so far)."""

    ahead: int = PREFETCH_AHEAD
    order: list[str] = field(default_factory=list)  # the keys of the last complete step, in call order
    position: dict[str, int] = field(default_factory=dict)
    current: list[str] = field(default_factory=list)
    device_bytes: int = 0
    peak_bytes: int = 0
    streams: dict[torch.device, Any] = field(default_factory=dict)  # CUDA device -> side stream

    # -- order -----------------------------------------------------------------------------------
    def started(self, key: str, channels_of: Callable[[str], Iterable[Any]]) -> None:
        """Key ``key`` starts an exchange: prefetch the bases of the keys that follow it."""
        self.current.append(key)
        i = self.position.get(key)
        if i is None or not self.order:
            return
        for k in range(1, self.ahead + 1):
            nxt = self.order[(i + k) % len(self.order)]
            if nxt != key:
                for channel in channels_of(nxt):
                    self.prefetch(channel)

    def end_step(self) -> None:
        """A step ended: its call order is the order of the next steps."""
        if self.current:
            self.order = self.current
            self.position = {}
            for i, key in enumerate(self.order):
                self.position.setdefault(key, i)
        self.current = []

    def begin_request(self) -> None:
        self.current = []

    # -- copies ----------------------------------------------------------------------------------
    def _stream(self, device: torch.device) -> Any:
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _to_device(self, host: HostBase) -> tuple[Union[torch.Tensor, QuantBase], Any]:
        """Start copying ``host`` to its device: ``(device copy, event or None)``."""
        if host.device.type != "cuda":
            return _map(host.wait(), lambda t: t.to(host.device, copy=True)), None
        stream = self._stream(host.device)
        with torch.cuda.stream(stream):  # after the write-back of the same host copy (FIFO)
            out = _map(host.stored, lambda t: t.to(host.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(stream)
        return out, event

    def _to_host(self, stored: Union[torch.Tensor, QuantBase], spare: Optional[HostBase]) -> HostBase:
        """Start writing a device base back to the host (into ``spare``'s buffers when they fit)."""
        device = stored.device
        old = spare.stored if spare is not None else None
        pin = device.type == "cuda"

        def buffer(t: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
            if like is not None and like.shape == t.shape and like.dtype == t.dtype:
                return like
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)

        if isinstance(stored, QuantBase):
            q_old = old if isinstance(old, QuantBase) else None
            host: Union[torch.Tensor, QuantBase] = QuantBase(
                buffer(stored.codes, q_old.codes if q_old else None),
                buffer(stored.scales, q_old.scales if q_old else None), stored.shape, stored.kind)
        else:
            host = buffer(stored, old if isinstance(old, torch.Tensor) else None)
        pairs = list(zip(tensors(host), tensors(stored)))
        if device.type != "cuda":
            for dst, src in pairs:
                dst.copy_(src)
            return HostBase(host, device)
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the update that made the base
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return HostBase(host, device, event)

    # -- channels --------------------------------------------------------------------------------
    def prefetch(self, channel: Any) -> None:
        """Start copying a channel's host base (and velocity) to its device."""
        if channel.prefetched is not None or not isinstance(channel.base, HostBase):
            return
        copies, events = {}, []
        for name in ("base", "velocity"):
            value = getattr(channel, name)
            if isinstance(value, HostBase):
                copies[name], event = self._to_device(value)
                events.append(event)
        channel.prefetched = (copies, [e for e in events if e is not None])
        self._resident(channel, sum(nbytes(v) for v in copies.values()))

    def bring(self, channel: Any, device: torch.device) -> None:
        """Make a channel's base (and velocity) device tensors: the prefetched copies, else copies now."""
        if channel.prefetched is None:
            if not isinstance(channel.base, HostBase):
                return
            self.prefetch(channel)
        copies, events = channel.prefetched
        if events and device.type == "cuda":
            current = torch.cuda.current_stream(device)
            for event in events:
                current.wait_event(event)
            for value in copies.values():
                for t in tensors(value):
                    t.record_stream(current)
        channel.spare = {name: getattr(channel, name) for name in copies}
        for name, value in copies.items():
            setattr(channel, name, value)
        channel.prefetched = None

    def evict(self, channel: Any) -> None:
        """After a channel's step: write its base (and velocity) back to the host; the device copies go."""
        spare = getattr(channel, "spare", None) or {}
        self._resident(channel, sum(nbytes(getattr(channel, n)) for n in ("base", "velocity")
                                    if not isinstance(getattr(channel, n), HostBase)))
        for name in ("base", "velocity"):
            value = getattr(channel, name)
            if value is not None and not isinstance(value, HostBase):
                setattr(channel, name, self._to_host(value, spare.get(name)))
        channel.spare = None
        self.forget(channel)

    def forget(self, channel: Any) -> None:
        """A channel leaves the window (evicted or dropped): its device bytes no longer count."""
        self.device_bytes -= channel.resident_bytes
        channel.resident_bytes = 0
        channel.prefetched = None

    def _resident(self, channel: Any, held: int) -> None:
        self.device_bytes += held - channel.resident_bytes
        channel.resident_bytes = held
        self.peak_bytes = max(self.peak_bytes, self.device_bytes)
