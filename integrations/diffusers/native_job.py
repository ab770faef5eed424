"""``compact-hooks run --mode native``: diffusers' own context parallelism with its collectives routed.

The job calls ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U,
ring_degree=R))`` once (:func:`enable_native`) and wraps each pipeline call in
:func:`~.native.compress_native_context_parallel` (:func:`parallel`); the other modes go to
:func:`~.parallel.parallelize`. On CPU the whole run sits in :func:`~.native_cpu.cpu_context_parallel`
(:func:`native_session`), which diffusers' native context parallelism needs there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from compact_hooks.hook import CommHook

from .common import split_pipeline
from .native import compress_native_context_parallel
from .parallel import parallelize


def native_degrees(ulysses: Optional[int], ring: Optional[int], world: int) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` of ``--mode native``: Ulysses over all ranks by default; one degree
    given, the other is ``world`` divided by it. A ``ValueError`` says which product to fix."""
    if world < 2:
        raise ValueError("--mode native needs at least 2 ranks (diffusers' context parallelism has no 1-rank "
                         "layout); launch with torchrun --nproc-per-node N")
    if ulysses is None and ring is None:
        ulysses, ring = world, 1
    elif ulysses is None:
        ulysses = world // ring if ring and world % ring == 0 else 0
    elif ring is None:
        ring = world // ulysses if ulysses and world % ulysses == 0 else 0
    if ulysses < 1 or ring < 1 or ulysses * ring != world:
        raise ValueError(f"--ulysses-degree x --ring-degree must equal the {world} ranks; got "
                         f"{ulysses} x {ring}")
    return ulysses, ring


def native_session(mode: str, device_type: str) -> Any:
    """The context the whole run needs: :func:`~.native_cpu.cpu_context_parallel` for native mode on CPU."""
    if mode == "native" and device_type == "cpu":
        from .native_cpu import cpu_context_parallel

        return cpu_context_parallel()
    return contextlib.nullcontext()


def enable_native(pipe: Any, ulysses: Optional[int], ring: Optional[int], world: int) -> tuple[int, int]:
    """``enable_parallelism`` on the pipeline's transformer (it needs a ``_cp_plan``); returns the degrees."""
    from diffusers import ContextParallelConfig

    u, r = native_degrees(ulysses, ring, world)
    model, _ = split_pipeline(pipe)
    if getattr(model, "_cp_plan", None) is None:
        raise ValueError(f"{type(model).__name__} has no _cp_plan, so diffusers cannot make it context parallel; "
                         f"use --mode ulysses, allgather, ring or usp")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r))
    return u, r


@contextlib.contextmanager
def parallel(pipe: Any, group: Any, mode: str, hook: CommHook, degrees: dict[str, Any]) -> Iterator[Any]:
    """``parallelize(pipe, group, mode=mode, hook=hook, **degrees)``, or for ``mode="native"`` the routed
    native context parallelism of a transformer :func:`enable_native` prepared. Yields the handle."""
    if mode == "native":
        with compress_native_context_parallel(pipe, hook) as handle:
            yield handle
    else:
        with parallelize(pipe, group, mode=mode, hook=hook, **degrees) as handle:
            yield handle
