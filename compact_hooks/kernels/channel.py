"""A :class:`~compact_hooks.residual.Channel`'s compressed (not full) steps on the fused kernels.

Mirrors ``Channel.encode`` / ``Channel.decode`` for ``full=False`` exactly: same payload bytes, same
new base, velocity and previous x, same non-finite count and NaN output. Uses the channel's
``compressor``, ``mode``, ``base``, ``velocity``, ``previous_x`` and ``_count``. No host reads:
the non-finite flag stays a device tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..wire import FLAGS_BYTE
from .common import on_device
from .dispatch import implementation


def poison_if(t: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """All-NaN where the 0-dim bool ``flag`` is set (``residual._poison_if`` without a host read)."""
    return torch.where(flag, torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)


def encode(channel: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``channel.encode(x, full=False)`` on the fused kernels: ``(payload, reconstruction)``."""
    mode = channel.mode
    fused = implementation(channel.compressor, tuple(x.shape))
    with on_device(x.device):
        step = fused.encode_step(channel.compressor, mode, x, None if mode == "none" else channel.base,
                                 channel.velocity if mode == "ef2" else None,
                                 channel.previous_x if mode == "delta" else None)
    if mode != "none":
        channel.base = step.base
    if mode == "ef2":
        channel.velocity = step.velocity
    if mode == "delta":
        channel.previous_x = step.previous_x
    channel._count(step.flag)
    return step.payload, poison_if(step.recon, step.flag)


def decode(channel: Any, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``channel.decode(payload, shape, dtype, full=False)`` on the fused kernels."""
    mode = channel.mode
    flag = payload[FLAGS_BYTE] != 0
    channel._count(flag)
    fused = implementation(channel.compressor, tuple(shape))
    with on_device(payload.device):
        step = fused.decode_step(channel.compressor, mode, payload, shape, dtype,
                                 None if mode == "none" else channel.base,
                                 channel.velocity if mode == "ef2" else None)
    if mode != "none":
        channel.base = step.base
    if mode == "ef2":
        channel.velocity = step.velocity
    return step.recon  # the kernel wrote it all-NaN if the payload is flagged
