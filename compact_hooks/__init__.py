"""compact-hooks: compressed residual collectives for parallel diffusion inference.

Quick start::

    import compact_hooks as ch
    hook = ch.build_hook({"compressor": "int2", "residual": "ef"})
    y = hook(ch.CollectiveCall("all_gather", x, group, key="blocks.0.attn:k"))
    work = hook.start(ch.CollectiveCall("all_to_all", q, group, key="blocks.0.attn:q"))  # async
    q_out = work.wait()
    hook.next_step()
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it, imported on first use (PEP 562): `import compact_hooks`
# loads no torch, so `compact-hooks --help` stays fast; `ch.build_hook` imports what it needs
_EXPORTS = {
    "Compressor": ".compressors.base",
    "CompactConfig": ".config",
    "load_config": ".config",
    "strip_config": ".config",
    "init_distributed": ".distributed",
    "CollectiveTimeoutError": ".errors",
    "CompactHooksError": ".errors",
    "ConfigError": ".errors",
    "ProtocolError": ".errors",
    "CollectiveCall": ".hook",
    "CommHook": ".hook",
    "WrappingHook": ".hook",
    "CastHook": ".hooks",
    "CompactHook": ".hooks",
    "LinkAwareHook": ".hooks",
    "PassthroughHook": ".hooks",
    "StaleHook": ".hooks",
    "build_hook": ".hooks",
    "available_compressors": ".registry",
    "build_compressor": ".registry",
    "register_compressor": ".registry",
    "Channel": ".residual",
    "Session": ".residual",
    "Stats": ".stats",
    "Topology": ".topology",
    "CollectiveWork": ".work",
    "OutstandingWorkError": ".work",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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
    from .work import CollectiveWork, OutstandingWorkError

__version__ = "0.1.0"

__all__ = [
    "CastHook",
    "CollectiveCall",
    "CollectiveTimeoutError",
    "CollectiveWork",
    "Channel",
    "CommHook",
    "CompactHook",
    "CompactConfig",
    "CompactHooksError",
    "Compressor",
    "ConfigError",
    "LinkAwareHook",
    "OutstandingWorkError",
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


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, ``ch.stats``) on first use and keep it."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
