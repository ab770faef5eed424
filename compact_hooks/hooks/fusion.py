"""fusable: whether call sites may travel as one message (Ulysses' Q, K and V in one all-to-all).

A hook treats calls at several keys alike unless per-call-site rules tell them apart: calls at
``blocks.3.attn:q``, ``:k``, ``:v`` may be sent as one call at ``blocks.3.attn:qkv`` when the same rule
(or none) matches each of them and the fused key. A rule that names roles ``q``, ``k`` or ``v``
alone thus keeps the three calls separate, with their own codecs, exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .. import collectives as C
from ..hook import CommHook
from ..policy import CallSite, first_match
from .compact import CompactHook

MAX_DEPTH = 8  # wrappers followed to the CompactHook inside


def rules_owner(hook: CommHook) -> Optional[CompactHook]:
    """The CompactHook whose rules decide ``hook``'s calls (through a StaleCompactHook, a
    LinkAwareHook's compressed side or a WrappingHook's inner hook); ``None`` when there is none."""
    for _ in range(MAX_DEPTH):
        if isinstance(hook, CompactHook):
            return hook
        inner = next((getattr(hook, a) for a in ("compact", "compressed", "inner")
                      if isinstance(getattr(hook, a, None), CommHook)), None)
        if inner is None:
            return None
        hook = inner
    return None


def fusable(hook: CommHook, keys: Sequence[str], fused: str, op: str, group: C.Group) -> bool:
    """Whether the calls at ``keys`` may be sent as one call at ``fused`` (same op and group): true
    unless ``hook``'s rules match them (or the fused key) with different rules. The same on every
    rank for the same config (a ``link`` rule reads the group's link class: one hostname exchange
    per group, the first time)."""
    owner = rules_owner(hook)
    if owner is None or not owner.config.rules:
        return True
    size = C.group_size(group)
    link = owner.topology.link_class(group) if owner.topology is not None else None
    rules = owner.config.rules
    return len({first_match(rules, CallSite(k, op, size, link)) for k in (*keys, fused)}) == 1
