"""Codecs, one module per family: ``cast``, ``quantize``, ``sparse``, ``lowrank``.

The registry imports the built-in modules on first lookup; importing ``compact_hooks`` does too.
"""

from .base import Compressor

__all__ = ["Compressor"]
