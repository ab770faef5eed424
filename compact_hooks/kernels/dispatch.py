"""Which path a channel step takes: the torch codecs or the fused Triton kernels.

Settings (config key ``kernels``):

* ``"auto"`` (default): the fused kernels for CUDA tensors when Triton is importable and the codec
  has kernels (``int8``, ``int4``, ``int2``, ``int1``, ``int2cf``); the torch codecs otherwise;
* ``"torch"``: always the torch codecs (the reference);
* ``"triton"``: the fused kernels for every codec that has them, on CUDA, or on the CPU under
  Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before the kernels are first
  used: how the test suite runs them); raises when neither is possible. Codecs without kernels
  keep the torch path.

Channels with 8-bit bases (``base_dtype`` ``"int8"`` / ``"fp8"``) or offloaded bases (``base_device``
``"cpu"``) always take the torch path (:func:`fused_base`): the kernels read and write float bases
on the device only. The torch path is the reference, so the bytes are the same by construction.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Optional

import torch

from . import group, sign

KERNEL_SETTINGS = ("auto", "torch", "triton")
_KERNEL_MODULE = "compact_hooks.kernels._group_kernels"


def triton_available() -> bool:
    """Whether ``import triton`` can succeed (nothing is imported here)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    """Whether the kernels run (or, once imported, will run) under Triton's interpreter."""
    module = sys.modules.get(_KERNEL_MODULE)
    if module is not None:
        return type(module.group_tile_kernel).__name__ == "InterpretedFunction"
    import triton

    return triton.knobs.runtime.interpret


def implementation(compressor: object, shape: tuple[int, ...]) -> Optional[ModuleType]:
    """The module with fused steps (``encode_step``, ``decode_step``) for ``compressor`` on tensors
    of ``shape``, or ``None`` (the torch path)."""
    for module in (group, sign):
        if module.supports(compressor, tuple(shape)):
            return module
    return None


def supports(compressor: object, shape: tuple[int, ...]) -> bool:
    """Whether fused kernels exist for ``compressor`` on tensors of ``shape``."""
    return implementation(compressor, shape) is not None


def fused_base(base_dtype: object, offloaded: bool) -> bool:
    """Whether the kernels handle bases stored as ``base_dtype`` (a float dtype, ``None``: the input's;
    not ``"int8"`` / ``"fp8"``), on the device (not ``offloaded``)."""
    return not offloaded and not isinstance(base_dtype, str)


def check_setting(setting: str) -> str:
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_SETTINGS)}; got {setting!r}")
    return setting


def use_fused(setting: str, compressor: object, device: torch.device, shape: tuple[int, ...]) -> bool:
    """Whether a compressed (not full) step of a stream of ``shape`` on ``device`` takes the fused path."""
    if check_setting(setting) == "torch" or not supports(compressor, shape):
        return False
    if setting == "auto":
        return device.type == "cuda" and triton_available() and not interpreting()
    if not triton_available():
        raise RuntimeError("kernels='triton' needs Triton: pip install triton (it is in the 'test' extra), "
                           "or set kernels to 'auto' or 'torch'")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"kernels='triton' on a {device.type} tensor runs only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 in the environment before the kernels are first used, "
                           "or set kernels to 'auto' or 'torch'")
    return True
