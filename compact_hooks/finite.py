"""Non-finite values in a channel step: find and zero them (``clean``), saturate a cast (``fit``),
and hand a flagged reconstruction back as all-NaN (``poison_if``)."""

from __future__ import annotations

import torch

from .bases import saturate_ as _saturate_


def clean(t: torch.Tensor, owned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` with non-finite values zeroed, and a 0-dim bool tensor: did it have any? (no host sync
    on accelerators). The exact test is on the extremes (``amax``/``amin`` propagate NaN; a sum of
    large finite values could overflow); on the CPU, where a host read is free, one fast sum proves
    most tensors clean first. ``owned``: ``t`` is a temporary that may be zeroed in place."""
    if t.numel() == 0:
        return t, torch.zeros((), dtype=torch.bool, device=t.device)
    if t.device.type == "cpu" and bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return t, torch.zeros((), dtype=torch.bool)
    flag = ~(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))
    if t.device.type == "cpu" and not bool(flag):
        return t, flag
    if owned:
        return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), flag
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), flag


def fit(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype``, saturated to its finite range when that is narrower (a float32 base
    feeding float16 activations never turns into inf)."""
    if t.dtype == dtype:
        return t
    return _saturate_(t.to(dtype))


def poison_if(t: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """All-NaN when ``flag`` is set: a sender's NaN/Inf stays visible downstream."""
    if t.device.type == "cpu":
        return torch.full_like(t, float("nan")) if bool(flag) else t
    return torch.where(flag, torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)
