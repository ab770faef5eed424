"""Host helpers shared by the fused codecs: value kinds, outputs, argument checks, launch options."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from ..wire import PayloadKind, header_bytes

MODE_CODES = {"none": 0, "delta": 1, "ef": 2, "ef2": 3}
KIND_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TILE = 2048  # elements per program: 8 per thread at 8 warps (about 100 registers on sm_90, no spills)
MAX_NUMEL = 2**31 - 2**24  # int32 offsets inside the kernels


@dataclass
class StepResult:
    """What one fused step produced (``None``: not part of this mode)."""

    recon: torch.Tensor
    base: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None
    previous_x: Optional[torch.Tensor] = None
    payload: Optional[torch.Tensor] = None
    flag: Optional[torch.Tensor] = None  # 0-dim bool on the device (encode only)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel pointer argument of a value tensor is: 16-bit floats travel as int16 bits."""
    return t.view(torch.int16) if t.element_size() == 2 else t


def header_words(dtype: torch.dtype, fingerprint: int, numel: int) -> tuple[int, ...]:
    """The 16 header bytes of a compressed payload as four little-endian int32 kernel arguments."""
    return struct.unpack("<4i", header_bytes(PayloadKind.COMPRESSED, dtype, fingerprint, numel))


def launch_options(elements: int = TILE) -> dict[str, object]:
    """Compile options of a launch whose programs handle ``elements`` values each: no FMA
    contraction (``r * inv + (off + 0.5)`` and ``pred + level * scale`` must round like the torch
    codecs' separate operations), and about 8 values per thread."""
    return {"enable_fp_fusion": False, "num_warps": max(4, min(16, elements // 256))}


def on_device(device: torch.device) -> ContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device, torch on the tensor's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_input(x_dtype: torch.dtype) -> None:
    if x_dtype not in KIND_CODES:
        raise TypeError(f"the fused codecs take float32, float16 or bfloat16 tensors; got {x_dtype}")


def check_state(mode: str, shape: torch.Size, base: Optional[torch.Tensor], velocity: Optional[torch.Tensor],
                previous_x: Optional[torch.Tensor], x_dtype: torch.dtype) -> None:
    """Clear errors for a mode without the state it needs."""
    if mode not in MODE_CODES:
        raise ValueError(f"residual mode must be one of {', '.join(MODE_CODES)}; got {mode!r}")
    if mode == "none":
        return
    if base is None or base.shape != shape or base.dtype not in KIND_CODES:
        raise ValueError(f"mode {mode!r} needs a float base of shape {tuple(shape)}; got "
                         f"{None if base is None else (tuple(base.shape), base.dtype)}")
    if velocity is not None and (velocity.shape != shape or velocity.dtype != base.dtype):
        raise ValueError("the ef2 velocity must have the base's shape and dtype")
    if mode == "delta" and (previous_x is None or previous_x.shape != shape or previous_x.dtype != x_dtype):
        raise ValueError("mode 'delta' needs the previous x, of the input's shape and dtype")


def check_payload(payload: torch.Tensor, expected: int, shape: torch.Size) -> torch.Tensor:
    """``payload`` checked, and copied when it starts at an odd byte (its fields are 16-bit)."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() < expected:
        raise ValueError(f"expected a 1-D uint8 payload of {expected} bytes for shape {tuple(shape)}; "
                         f"got {payload.dtype} of shape {tuple(payload.shape)}")
    if payload.storage_offset() % 2 or not payload.is_contiguous():
        payload = payload.contiguous().clone()  # a slice of a gathered buffer may start at an odd byte
    return payload


def outputs(mode: str, shape: torch.Size, x_dtype: torch.dtype, base: Optional[torch.Tensor],
            device: torch.device, receiver: bool = False) -> StepResult:
    """New tensors for the step's results (a step never writes the old base). A receiver's output is
    never its new base: the kernel writes it all-NaN for a flagged payload."""
    if mode == "none":
        return StepResult(recon=torch.empty(shape, dtype=x_dtype, device=device))
    assert base is not None
    new_base = torch.empty(shape, dtype=base.dtype, device=device)
    share = base.dtype == x_dtype and not receiver
    recon = new_base if share else torch.empty(shape, dtype=x_dtype, device=device)
    velocity = torch.empty_like(new_base) if mode == "ef2" else None
    return StepResult(recon=recon, base=new_base, velocity=velocity)


def state_args(mode: str, x: Optional[torch.Tensor], base, velocity, previous_x, out: StepResult,
               dummy: torch.Tensor, flag: Optional[torch.Tensor],
               flag_byte: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The kernels' tensor arguments (``dummy`` where a mode has no such tensor: never read);
    ``flag`` is the sender's int32 non-finite flag, ``flag_byte`` the receiver's payload flag byte."""
    def arg(t: Optional[torch.Tensor]) -> torch.Tensor:
        return bits_view(t.contiguous()) if t is not None else dummy  # the kernels index flat memory

    return dict(x_ptr=arg(x), base_ptr=arg(base), vel_ptr=arg(velocity), prev_ptr=arg(previous_x),
                out_base_ptr=arg(out.base), out_vel_ptr=arg(out.velocity), out_prev_ptr=arg(out.previous_x),
                out_recon_ptr=arg(out.recon), flag_ptr=flag if flag is not None else dummy,
                flag_byte_ptr=flag_byte if flag_byte is not None else dummy)


def kind_args(mode: str, x_dtype: torch.dtype, base: Optional[torch.Tensor], velocity, out: StepResult) -> dict:
    """The kernels' constexpr arguments describing dtypes and the residual mode."""
    return dict(X_KIND=KIND_CODES[x_dtype], B_KIND=KIND_CODES[base.dtype] if base is not None else 0,
                MODE=MODE_CODES[mode], HAS_VEL=velocity is not None,
                WRITE_RECON=mode == "none" or out.recon is not out.base)
