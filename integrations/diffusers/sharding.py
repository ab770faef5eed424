"""Token sharding for one parallelized transformer: pad, split and gather token segments.

A :class:`ShardState` belongs to one parallelized model. At the start of each forward it is cleared;
the model's shard points (forward hooks, see ``families``) register each token segment
(``"text"``, ``"image"``) with its true length as they shard it, and the attention processors read the
resulting layout. Padding repeats the segment's last token (real values: no NaN/Inf in padded rows);
padded keys are masked in attention and padded rows are cut when the output is gathered.
"""

from __future__ import annotations

from typing import Any

import torch

from compact_hooks.collectives import all_gather

from .attention import AttentionComm, Segment, SequenceLayout


def pad_tokens(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Pad ``x`` along ``dim`` to ``size`` by repeating its last entry."""
    length = x.shape[dim]
    if length == size:
        return x
    if length == 0:
        raise ValueError("cannot pad an empty token segment")
    last = x.narrow(dim, length - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = size - length
    return torch.cat([x, last.repeat(*reps)], dim=dim)


class ShardState:
    """The communication settings and the token layout of the current forward of one model."""

    def __init__(self, comm: AttentionComm) -> None:
        self.comm = comm
        self.segments: dict[str, Segment] = {}
        self.stash: dict[str, Any] = {}

    def begin_forward(self) -> None:
        self.segments = {}
        self.stash = {}

    def _register(self, name: str, length: int) -> Segment:
        seg = self.segments.get(name)
        if seg is None:
            seg = self.segments[name] = Segment(length, self.comm.world)
        elif seg.length != length:
            raise ValueError(
                f"the {name} tokens have inconsistent lengths in one forward ({seg.length} and {length}); "
                f"the inputs of the transformer disagree with each other"
            )
        return seg

    def shard(self, x: torch.Tensor, dim: int, segment: str) -> torch.Tensor:
        """This rank's shard of ``x`` along ``dim`` (padded to a multiple of the group size first)."""
        seg = self._register(segment, x.shape[dim])
        if self.comm.world == 1:
            return x
        x = pad_tokens(x, dim, seg.local * seg.world)
        return x.narrow(dim, self.comm.rank * seg.local, seg.local)

    def gather(self, x: torch.Tensor, dim: int, segment: str) -> torch.Tensor:
        """All ranks' shards of ``segment`` concatenated along ``dim``, padding removed (exact, not hooked)."""
        seg = self.segments.get(segment)
        if seg is None:
            raise RuntimeError(f"no {segment} tokens were sharded in this forward; cannot gather them")
        if self.comm.world == 1:
            return x
        if x.shape[dim] != seg.local:
            raise RuntimeError(f"expected {seg.local} local {segment} tokens to gather, got {x.shape[dim]}")
        return all_gather(x.contiguous(), self.comm.group, dim=dim, timeout_s=self.comm.timeout_s).narrow(dim, 0, seg.length)

    def layout(self, *names: str) -> SequenceLayout:
        missing = [n for n in names if n not in self.segments]
        if missing:
            raise RuntimeError(
                f"attention ran outside a parallelized forward or before its {', '.join(missing)} tokens were "
                f"sharded; call the transformer itself (not a block) after parallelize()"
            )
        return SequenceLayout(tuple(self.segments[n] for n in names))

    def layout_for(self, seq_len: int, *orders: tuple[str, ...], where: str = "") -> SequenceLayout:
        """The first of ``orders`` whose local length is ``seq_len``."""
        for order in orders:
            if all(n in self.segments for n in order):
                layout = self.layout(*order)
                if layout.local == seq_len:
                    return layout
        known = {n: s.local for n, s in self.segments.items()}
        raise RuntimeError(f"{where}: an attention input of {seq_len} local tokens matches none of {known}")
