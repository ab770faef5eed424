"""compact-hooks: compressed residual collectives for parallel diffusion inference.

Quick start::

    import compact_hooks as ch
    hook = ch.build_hook({"compressor": "int2", "residual": "ef"})
    y = hook(ch.CollectiveCall("all_gather", x, group, key="blocks.0.attn:k"))
    hook.next_step()
"""

from .compressors.base import Compressor
from .config import CompactConfig, load_config, strip_config
from .distributed import init_distributed
from .errors import CollectiveTimeoutError, CompactHooksError, ConfigError, ProtocolError
from .hook import CollectiveCall, CommHook, WrappingHook
from .hooks import CastHook, CompactHook, LinkAwareHook, PassthroughHook, StaleHook, build_hook
from .registry import available_compressors, build_compressor, register_compressor
from .residual import Channel, Session
from .stats import Stats
from .topology import Topology

__version__ = "0.1.0"

__all__ = [
    "CastHook",
    "CollectiveCall",
    "CollectiveTimeoutError",
    "Channel",
    "CommHook",
    "CompactHook",
    "CompactConfig",
    "CompactHooksError",
    "Compressor",
    "ConfigError",
    "LinkAwareHook",
    "PassthroughHook",
    "ProtocolError",
    "Session",
    "StaleHook",
    "Stats",
    "Topology",
    "WrappingHook",
    "available_compressors",
    "build_compressor",
    "build_hook",
    "init_distributed",
    "load_config",
    "register_compressor",
    "strip_config",
]
