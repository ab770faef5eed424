"""The built-in hooks: :class:`PassthroughHook` (plain, the parity baseline), :class:`CastHook`,
:class:`CompactHook` (residual compression), :class:`StaleHook` (DistriFusion's stale
activations), :class:`StaleCompactHook` (stale exchanges of compressed residuals),
:class:`LinkAwareHook` (compress only groups that span hosts), and :func:`build_hook` to pick one
from a config. The interface they implement is in :mod:`compact_hooks.hook`."""

from .build import build_hook
from .compact import CompactHook
from .links import LinkAwareHook
from .plain import CastHook, PassthroughHook
from .stale import StaleHook
from .stale_compact import StaleCompactHook

__all__ = ["CastHook", "CompactHook", "LinkAwareHook", "PassthroughHook", "StaleCompactHook", "StaleHook",
           "build_hook"]
