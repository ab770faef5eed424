"""Rank programs of tests/test_relay_choice.py: ``plain_when_faster`` on real gloo groups."""

from __future__ import annotations

from typing import Any, Optional

import torch

import compact_hooks as ch
from tests.relay_workers import block, relay_blocks

STEPS = 6
CFG = {"compressor": "int2", "residual": "ef", "timeout_s": 60}


def choice_worker(rank: int, world: int, seconds_per_byte: Optional[float]) -> dict[str, Any]:
    """Relays of two call sites through a hook with ``plain_when_faster`` and through one without.
    ``seconds_per_byte``: the link measurement given to the choice instead of the probe's (``None``:
    probed on this link). Per step: whether the blocks equal the option-less hook's, and the exact ones."""
    chosen, alone = ch.CompactHook({**CFG, "plain_when_faster": True}), ch.CompactHook(CFG)
    if seconds_per_byte is not None:
        assert chosen.relay_choice is not None
        chosen.relay_choice.seconds_per_byte[tuple(range(world))] = seconds_per_byte
    steps = []
    for step in range(STEPS):
        row: dict[str, Any] = {}
        for key in ("blocks.0.attn:k", "blocks.1.attn:k"):
            x = block(rank, step) * (1 + int(key[7]))
            got, ref = relay_blocks(chosen, x, key), relay_blocks(alone, x, key)
            exact = [block((rank - hop) % world, step) * (1 + int(key[7])) for hop in range(1, world)]
            row[key] = {"as_without": all(torch.equal(a, b) for a, b in zip(got, ref)),
                        "exact": all(torch.equal(a, b) for a, b in zip(got, exact))}
        steps.append(row)
        chosen.next_step()
        alone.next_step()
    stats = chosen.stats()
    return {"steps": steps, "choice": stats["relay_choice"],
            "plain_hops": {k: v.get("plain_calls", 0) for k, v in stats["per_key"].items()}}
