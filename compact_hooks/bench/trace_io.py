"""Activation traces: record the tensors a hook sees, one safetensors shard per rank and step, and read them back.

A trace directory::

    manifest.json                 format, model, world size, steps, requests, keys {op, shape, dtype, steps}
    rank0/r000_s0000.safetensors  the tensors of rank 0, request 0, step 0 (one tensor per key, dtype as given)
    rank1/...

:class:`TraceRecorder` wraps any CommHook (``compact-hooks run --record-trace DIR``); the wrapped hook
still does the collective. :func:`read_trace` yields each (rank, key)'s tensors in step order, for the
offline replay of ``compact-hooks bench trace``.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from compact_hooks.hook import CollectiveCall, CommHook, WrappingHook

FORMAT = "compact-hooks-trace/1"
MANIFEST = "manifest.json"


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("traces need safetensors: pip install safetensors (or 'compact-hooks[diffusers]')") from exc
    save_file(tensors, str(path))


class TraceRecorder(WrappingHook):
    """A hook that records ``call.tensor`` of the keys matching ``patterns`` (globs) and forwards every call.

    Each step's tensors go to ``out/rank<r>/r<request>_s<step>.safetensors`` when the step ends; at most
    ``max_steps`` steps of each request are kept. Calls without a key are named ``<op>#<n>`` (n-th of the
    step); a key called twice in a step gets ``#2``, ``#3``...
    """

    def __init__(self, inner: CommHook, out: "str | Path", patterns: Sequence[str] = ("*",), rank: int = 0,
                 max_steps: Optional[int] = None) -> None:
        if not patterns:
            raise ValueError("TraceRecorder needs at least one key pattern, e.g. ['*attn:k'] or ['*']")
        super().__init__(inner)
        self.out = Path(out)
        self.patterns = tuple(patterns)
        self.rank = rank
        self.max_steps = max_steps
        self.request = -1
        self.step = 0
        self.pending: dict[str, torch.Tensor] = {}
        self.keys: dict[str, dict[str, Any]] = {}
        self.shards: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}

    def _name(self, call: CollectiveCall) -> str:
        base = call.key if call.key is not None else f"{call.op}#{self.counts.get(call.op, 0) + 1}"
        if call.key is None:
            self.counts[call.op] = self.counts.get(call.op, 0) + 1
        name, n = base, 1
        while name in self.pending:
            n += 1
            name = f"{base}#{n}"
        return name

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        if self.request < 0:
            self.begin_request(inner=False)
        name = self._name(call)
        recording = self.max_steps is None or self.step < self.max_steps
        if recording and any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            t = call.tensor.detach().to("cpu", copy=True).contiguous()
            self.pending[name] = t
            entry = self.keys.setdefault(name, {"op": call.op, "shape": list(t.shape),
                                                "dtype": str(t.dtype).removeprefix("torch."), "steps": 0})
            if entry["shape"] != list(t.shape) or entry["dtype"] != str(t.dtype).removeprefix("torch."):
                entry.update(shape=None, dtype=None)  # changes between steps: see each shard
            entry["steps"] += 1
        return self.inner(call)

    def _flush(self) -> None:
        if self.pending:
            folder = self.out / f"rank{self.rank}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"r{self.request:03d}_s{self.step:04d}.safetensors"
            _save_file(self.pending, folder / name)
            self.shards.append({"request": self.request, "step": self.step, "file": f"rank{self.rank}/{name}",
                                "keys": sorted(self.pending)})
        self.pending = {}
        self.counts = {}

    def begin_request(self, inner: bool = True) -> None:
        self._flush()
        self.request += 1
        self.step = 0
        if inner:
            self.inner.begin_request()

    def next_step(self) -> None:
        self._flush()
        self.step += 1
        self.inner.next_step()

    def close(self) -> dict[str, Any]:
        """Write what is pending; return this rank's part of the manifest."""
        self._flush()
        return {"rank": self.rank, "keys": self.keys, "shards": self.shards}


def write_manifest(out: "str | Path", parts: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """Merge every rank's :meth:`TraceRecorder.close` into ``out/manifest.json`` (rank 0 calls this)."""
    keys: dict[str, dict[str, Any]] = {}
    for part in sorted(parts, key=lambda p: p["rank"]):
        for k, v in part["keys"].items():
            keys.setdefault(k, dict(v))
    steps = sorted({(s["request"], s["step"]) for p in parts for s in p["shards"]})
    manifest = {"format": FORMAT, **meta, "world_size": meta.get("world_size", len(parts)),
                "requests": len({r for r, _ in steps}), "steps": len(steps), "keys": keys,
                "ranks": [{"rank": p["rank"], "shards": p["shards"]} for p in sorted(parts, key=lambda p: p["rank"])]}
    path = Path(out) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(trace: "str | Path") -> dict[str, Any]:
    path = Path(trace) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{trace}: no {MANIFEST}; record a trace with `compact-hooks run --record-trace DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


Stream = list[tuple[int, torch.Tensor]]


def read_streams(trace: "str | Path", patterns: Sequence[str] = ("*",)) -> Iterator[tuple[int, str, Stream]]:
    """``(rank, key, [(step, tensor), ...])`` for every recorded key matching ``patterns``, per rank, with
    each request's steps in order (the step number restarts at 0 with each request)."""
    from safetensors import safe_open

    manifest = load_manifest(trace)
    root = Path(trace)
    for r in manifest["ranks"]:
        series: dict[str, Stream] = {}
        for shard in sorted(r["shards"], key=lambda s: (s["request"], s["step"])):
            with safe_open(str(root / shard["file"]), framework="pt") as f:
                for key in f.keys():
                    if any(fnmatch.fnmatchcase(key, p) for p in patterns):
                        series.setdefault(key, []).append((int(shard["step"]), f.get_tensor(key)))
        for key in sorted(series):
            yield int(r["rank"]), key, series[key]


def trace_patterns(flag: Optional[str], config_path: "str | Path | None" = None) -> list[str]:
    """Key globs to record: ``flag`` (comma-separated), else the config file's top-level
    ``"trace": {"keys": [...]}``, else every key."""
    if flag:
        return [p.strip() for p in flag.split(",") if p.strip()]
    if config_path is not None and Path(config_path).is_file():
        block = json.loads(Path(config_path).read_text()).get("trace") or {}
        keys = block.get("keys") if isinstance(block, dict) else None
        if isinstance(keys, str):
            return [keys]
        if keys is not None:
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"{config_path}: trace.keys must be a glob or a list of globs; got {keys!r}")
            return list(keys)
    return ["*"]


def finish(recorder: TraceRecorder, group: Any = None, **meta: Any) -> Optional[dict[str, Any]]:
    """Close ``recorder`` on every rank of ``group``; rank 0 writes the manifest and returns it."""
    import torch.distributed as dist

    part = recorder.close()
    if dist.is_available() and dist.is_initialized():
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, part, group=group)
        if dist.get_rank(group) != 0:
            return None
    else:
        parts = [part]
    return write_manifest(recorder.out, parts, **meta)
