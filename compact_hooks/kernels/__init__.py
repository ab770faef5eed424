"""Fused Triton kernels of the codecs (residual + quantize + pack + base update in one pass).

The torch codecs (:mod:`compact_hooks.compressors`) and :class:`~compact_hooks.residual.Channel`
stay the reference: the kernels produce the same payload bytes and the same bases, bit for bit,
so a sender on one path and a receiver on the other stay in lock-step. Triton is imported only
when a kernel runs. See :mod:`.dispatch` for when they are used and :mod:`.group` for the passes.
"""

from .channel import decode as channel_decode
from .channel import encode as channel_encode
from .dispatch import (
    KERNEL_SETTINGS,
    check_setting,
    fused_base,
    implementation,
    interpreting,
    supports,
    triton_available,
    use_fused,
)

__all__ = ["KERNEL_SETTINGS", "channel_decode", "channel_encode", "check_setting", "fused_base", "implementation",
           "interpreting", "supports", "triton_available", "use_fused"]
