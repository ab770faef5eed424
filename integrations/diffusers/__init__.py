"""Sequence-parallel diffusers transformers whose attention collectives go through a CommHook.

Usage (every rank runs the same code with the same inputs and seed)::

    import compact_hooks as ch
    from compact_hooks.integrations.diffusers import parallelize

    hook = ch.build_hook(ch.load_config("ds_config.json"))
    handle = parallelize(pipe, group=None, mode="ulysses", hook=hook)   # or pipe.transformer
    image = pipe(prompt_embeds=..., generator=torch.Generator().manual_seed(0)).images[0]
    handle.remove()

The package, by module:

* ``parallel``: :func:`parallelize` and its :class:`ParallelHandle` (swap processors, shard, gather);
* ``families``: per-model plans (Flux, SD3, PixArt, DiT, CogVideoX): where tokens are sharded and gathered;
* ``processors``: the sequence-parallel attention processors that replace the stock ones;
* ``attention``: the Ulysses / all-gather / ring attention cores, whose collectives go through the hook;
* ``sharding``: padding, splitting and gathering token segments (:class:`ShardState`);
* ``native``: :func:`compress_native_context_parallel` for diffusers' own context parallelism;
* ``common``: hook resolution, pipeline unwrapping, step/request tracking;
* ``tiny``: random-weight models and inputs built from config (tests, the default model of ``run``);
* ``job``: the ``compact-hooks run`` job (``python -m compact_hooks.integrations.diffusers.job``).
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "compact_hooks.integrations.diffusers needs diffusers: pip install 'compact-hooks[diffusers]'"
    ) from exc

from .common import resolve_hook
from .families import FAMILIES
from .native import NativeHandle, compress_native_context_parallel
from .parallel import ParallelHandle, attention_processors, parallelize

__all__ = [
    "FAMILIES",
    "NativeHandle",
    "ParallelHandle",
    "attention_processors",
    "compress_native_context_parallel",
    "parallelize",
    "resolve_hook",
]

