"""Rank programs of tests/test_relay_choice.py: ``plain_when_faster`` on real gloo groups."""

from __future__ import annotations

from typing import Any, Optional

import torch

import compact_hooks as ch
from tests.relay_workers import block, rel_error, relay_blocks

STEPS = 6
CFG = {"compressor": "int2", "residual": "ef", "timeout_s": 60}
SITES = ("blocks.0.attn:k", "blocks.1.attn:k")


def choice_worker(rank: int, world: int, seconds_per_byte: Optional[float]) -> dict[str, Any]:
    """Relays of two call sites through a hook with ``plain_when_faster`` and through one without.
    ``seconds_per_byte``: the link measurement given to the choice instead of the probe's (``None``:
    probed on this link). Per step and site: whether the blocks equal the option-less hook's, whether
    they are exact, their largest relative error, and the bytes of each source's block (to compare
    receivers)."""
    chosen, alone = ch.CompactHook({**CFG, "plain_when_faster": True}), ch.CompactHook(CFG)
    if seconds_per_byte is not None:
        assert chosen.relay_choice is not None
        chosen.relay_choice.seconds_per_byte[tuple(range(world))] = seconds_per_byte
    steps = []
    for step in range(STEPS):
        row: dict[str, Any] = {}
        for scale, key in enumerate(SITES, start=1):
            x = block(rank, step) * scale
            got, ref = relay_blocks(chosen, x, key), relay_blocks(alone, x, key)
            exact = [block((rank - hop) % world, step) * scale for hop in range(1, world)]
            row[key] = {"as_without": all(torch.equal(a, b) for a, b in zip(got, ref)),
                        "exact": all(torch.equal(a, b) for a, b in zip(got, exact)),
                        "error": max(rel_error(a, b) for a, b in zip(got, exact)),
                        "error_without": max(rel_error(a, b) for a, b in zip(ref, exact)),
                        "blocks": {(rank - hop) % world: got[hop - 1].numpy().tobytes().hex()
                                   for hop in range(1, world)}}
        steps.append(row)
        chosen.next_step()
        alone.next_step()
    stats = chosen.stats()
    return {"steps": steps, "choice": stats["relay_choice"],
            "plain_hops": {k: v.get("plain_calls", 0) for k, v in stats["per_key"].items()}}
