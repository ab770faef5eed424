"""Counters of a session: raw bytes, wire bytes, full sends, plain calls, non-finite values, sampled error.

Counters are kept per call site and group: a key used on two process groups (two models with the
same module names) is counted, and its error sampled, per group. ``as_dict`` names an entry by its
key alone when this rank uses the key on one group, else ``key@0,1,2`` (the group's global ranks)
for each group.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

MAX_STEPS = 10_000  # per-step rows kept in Stats.per_step (the most recent)
MAX_WARNINGS = 1_000  # warning lines kept in Stats.warnings (the most recent)


@dataclass
class KeyStats:
    """Totals of one call site on one group. Bytes are what this rank sends (ring/pairwise
    algorithms). ``full_sends``: compressed calls that sent a full tensor (warm-up, resync, new
    shape); ``plain_calls``: calls that took the plain collective (non-float or empty tensors, ops
    not compressed, lossless codecs, "plain" rules, tensors too small to gain)."""

    op: str
    calls: int = 0
    full_sends: int = 0
    plain_calls: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    error_samples: int = 0
    error_sum: float = 0.0
    last_error: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "error_sum"}
        d["rel_error"] = self.error_sum / self.error_samples if self.error_samples else None
        d["compression_ratio"] = self.raw_bytes / self.wire_bytes if self.wire_bytes else None
        return d


@dataclass
class Stats:
    """All counters of a session; ``as_dict()`` is what ``hook.stats()`` returns."""

    enabled: bool = True
    error_every: int = 0
    per_key: dict[tuple[str, tuple[int, ...]], KeyStats] = field(default_factory=dict)  # (key, group ranks)
    # the most recent steps only: a long-running server must not grow without bound
    per_step: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_STEPS))
    step_raw: int = 0
    step_wire: int = 0
    resyncs: int = 0
    nonfinite: int = 0  # payloads with NaN/Inf this rank sent or received, of dropped channels
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_WARNINGS))

    def key(self, key: str, op: str, ranks: tuple[int, ...] = ()) -> KeyStats:
        ks = self.per_key.get((key, ranks))
        if ks is None:
            ks = self.per_key[(key, ranks)] = KeyStats(op=op)
        return ks

    def record(self, key: str, op: str, raw_bytes: int, wire_bytes: int, full: bool,
               ranks: tuple[int, ...] = (), plain: bool = False) -> KeyStats:
        """Count one call of ``key`` on the group of global ``ranks``: a full send if ``full``, a
        plain collective if ``plain``."""
        ks = self.key(key, op, ranks)
        if self.enabled:
            ks.calls += 1
            ks.full_sends += int(full)
            ks.plain_calls += int(plain)
            ks.raw_bytes += raw_bytes
            ks.wire_bytes += wire_bytes
            self.step_raw += raw_bytes
            self.step_wire += wire_bytes
        return ks

    def wants_error(self, ks: KeyStats) -> bool:
        return self.enabled and self.error_every > 0 and ks.calls % self.error_every == 1 % self.error_every

    def record_error(self, ks: KeyStats, reconstruction: torch.Tensor, exact: torch.Tensor) -> None:
        err = float(torch.linalg.vector_norm((reconstruction - exact).float())
                    / torch.linalg.vector_norm(exact.float()).clamp_min(1e-30))
        ks.error_samples += 1
        ks.error_sum += err
        ks.last_error = err

    def end_step(self, request: int, step: int) -> None:
        if self.enabled and (self.step_raw or self.step_wire):
            self.per_step.append({"request": request, "step": step, "raw_bytes": self.step_raw,
                                  "wire_bytes": self.step_wire})
        self.step_raw = self.step_wire = 0

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def as_dict(self) -> dict[str, Any]:
        raw = sum(k.raw_bytes for k in self.per_key.values())
        wire = sum(k.wire_bytes for k in self.per_key.values())
        groups: dict[str, int] = {}
        for key, _ in self.per_key:
            groups[key] = groups.get(key, 0) + 1
        per_key = {key if groups[key] == 1 else f"{key}@{','.join(map(str, ranks))}": ks.as_dict()
                   for (key, ranks), ks in self.per_key.items()}
        return {
            "raw_bytes": raw,
            "wire_bytes": wire,
            "compression_ratio": raw / wire if wire else None,
            "calls": sum(k.calls for k in self.per_key.values()),
            "full_sends": sum(k.full_sends for k in self.per_key.values()),
            "plain_calls": sum(k.plain_calls for k in self.per_key.values()),
            "resyncs": self.resyncs,
            "nonfinite": self.nonfinite,
            "warnings": list(self.warnings),
            "per_key": per_key,
            "per_step": list(self.per_step),
        }

    def clear(self) -> None:
        self.per_key.clear()
        self.per_step.clear()
        self.warnings.clear()
        self.step_raw = self.step_wire = self.resyncs = self.nonfinite = 0


def write_json(stats: dict[str, Any], path: Union[str, os.PathLike[str]]) -> None:
    """Write a stats dict as indented JSON."""
    with open(path, "w") as f:
        json.dump(stats, f, indent=2, default=str)
        f.write("\n")
