"""build_hook: the hook a config asks for."""

from __future__ import annotations

from typing import Any

import torch

from ..config import load_config
from ..hook import CommHook
from .compact import CompactHook
from .links import LinkAwareHook
from .plain import CastHook, PassthroughHook
from .stale import StaleHook
from .stale_compact import StaleCompactHook


def build_hook(config: Any = None) -> CommHook:
    """The hook a config asks for: ``hook`` selects compact, stale, passthrough or cast;
    ``enabled: false`` gives a :class:`PassthroughHook`; ``links: "inter_host"`` wraps the
    CompactHook in a :class:`LinkAwareHook` that sends groups within one host plain; ``stale: true``
    makes it a :class:`StaleCompactHook` (each exchange used one step later). Every hook waits at
    most the config's ``timeout_s`` for a peer."""
    cfg = load_config(config)
    if not cfg.enabled or cfg.hook == "passthrough":
        return PassthroughHook(cfg.timeout_s)
    if cfg.hook == "cast":
        return CastHook(getattr(torch, cfg.cast_dtype), cfg.timeout_s)
    if cfg.hook == "stale":
        return StaleHook(max(1, cfg.warmup_steps), timeout_s=cfg.timeout_s)
    compact: CommHook = StaleCompactHook(cfg) if cfg.stale else CompactHook(cfg)
    if cfg.links == "inter_host":  # compress only groups that span hosts; the rest go plain
        return LinkAwareHook(compact, PassthroughHook(cfg.timeout_s))
    return compact
