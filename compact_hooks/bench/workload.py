"""The workload the benchmarks measure on: a synthetic DiT-like activation stream and its errors.

:func:`activation_walk` stands in for the activations one collective sees over the denoising steps;
:func:`walk_error` pushes such a stream through one residual :class:`~compact_hooks.residual.Channel`
and reports the relative error of every step.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from compact_hooks.compressors.base import Compressor
from compact_hooks.residual import Channel


def activation_walk(shape: tuple[int, ...], steps: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                    drift: float = 0.05, device: str = "cpu") -> Iterator[torch.Tensor]:
    """A smooth random walk shaped like DiT activations: a low-rank token/channel structure with
    heavy-tailed per-channel scales, drifting by about ``drift`` of its norm per step."""
    g = torch.Generator().manual_seed(seed)
    tokens, channels = int(torch.Size(shape[:-1]).numel()), shape[-1]
    rank = min(16, tokens, channels)
    scale = torch.exp(0.8 * torch.randn(channels, generator=g))
    u, v = torch.randn(tokens, rank, generator=g), torch.randn(rank, channels, generator=g)
    x = (u @ v / rank**0.5 + 0.3 * torch.randn(tokens, channels, generator=g)) * scale
    du = torch.randn(tokens, rank, generator=g)
    for _ in range(steps):
        yield x.reshape(shape).to(device=device, dtype=dtype)
        du = 0.9 * du + 0.1 * torch.randn(tokens, rank, generator=g)
        step = (du @ v / rank**0.5 + 0.1 * torch.randn(tokens, channels, generator=g)) * scale
        x = x + drift * step * (x.norm() / step.norm())


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((approx - exact).float()) / torch.linalg.vector_norm(exact.float()).clamp_min(1e-30))


def walk_error(codec: Compressor, shape: tuple[int, ...], dtype: torch.dtype, steps: int, mode: str = "ef",
               device: str = "cpu", warmup: Optional[Compressor] = None) -> list[float]:
    """Per-step relative error of one stream (full send on step 0, lossy with a ``warmup`` codec,
    then residuals) under ``mode``."""
    channel = Channel(codec, mode, None, warmup)
    errors = []
    for t, x in enumerate(activation_walk(shape, steps, dtype, device=device)):
        _, recon = channel.encode(x, full=(t == 0 and mode != "none"))
        errors.append(rel_error(recon, x))
    return errors
