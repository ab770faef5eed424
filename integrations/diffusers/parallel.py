"""``parallelize``: sequence-parallel diffusers transformers whose attention collectives go through a CommHook.

Usage (every rank runs the same code with the same inputs and seed)::

    import compact_hooks as ch
    from compact_hooks.integrations.diffusers import parallelize

    hook = ch.build_hook(ch.load_config("ds_config.json"))
    handle = parallelize(pipe, group=None, mode="ulysses", hook=hook)   # or pipe.transformer
    image = pipe(prompt_embeds=..., generator=torch.Generator().manual_seed(0)).images[0]
    handle.remove()

``parallelize`` shards the token sequence inside the transformer's forward (see
``families``), swaps the attention processors (``set_attn_processor``) for sequence-parallel
ones (``processors``) and gathers the output, so the transformer keeps its signature and
returns the full output on every rank. Collectives are keyed by module name
(``"transformer_blocks.3.attn:k"``). A pipeline ``__call__`` is a request (``hook.begin_request()``),
a transformer forward is a step (``hook.next_step()`` after it). For diffusers' own context
parallelism see :func:`~.native.compress_native_context_parallel`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from compact_hooks.collectives import all_gather, group_rank, group_size
from compact_hooks.hook import CommHook

from .attention import MODES, AttentionComm, check_heads
from .common import HookLike, StepTracker, bind_arguments, resolve_hook, split_pipeline
from .families import Family, family_of, is_self_attention
from .processors import ParallelProcessor
from .sharding import ShardState

__all__ = ["ParallelHandle", "attention_processors", "parallelize", "set_attention_processors"]


class ParallelHandle:
    """What :func:`parallelize` installed on one transformer (and pipeline); :meth:`remove` undoes it."""

    def __init__(
        self,
        model: nn.Module,
        pipeline: Optional[Any],
        family: Family,
        state: ShardState,
        check_inputs: bool,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.family = family
        self.state = state
        self.check_inputs = check_inputs
        self.tracker = StepTracker(state.comm.hook, pipeline)
        self.original_processors: dict[str, Any] = {}
        self.hooks: list[RemovableHandle] = []
        self.removed = False

    @property
    def hook(self) -> CommHook:
        return self.state.comm.hook

    @property
    def mode(self) -> str:
        return self.state.comm.mode

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.state.comm.group

    def begin_request(self) -> None:
        """Start a request (called by the wrapped pipeline's ``__call__``; call it yourself otherwise)."""
        self.tracker.begin_request()

    # -- installation ----------------------------------------------------------------------------

    def install(self) -> None:
        self._swap_processors()
        self.hooks += self.family.install(self.model, self.state)
        self.hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self.hooks.append(self.model.register_forward_hook(self._after_forward))
        self.tracker.wrap_pipeline()

    def _swap_processors(self) -> None:
        current = attention_processors(self.model)
        swapped: dict[str, Any] = {}
        for module_name, proc in current.items():
            module = self.model.get_submodule(module_name)
            parallel_cls = self.family.processors.get(type(proc).__name__)
            if parallel_cls is not None and is_self_attention(module):
                swapped[module_name] = parallel_cls(module_name, self.state)
            elif is_self_attention(module):
                raise ValueError(
                    f"{module_name} uses {type(proc).__name__}, which parallelize() cannot make sequence-parallel "
                    f"(supported for {type(self.model).__name__}: {', '.join(self.family.processors)}); call "
                    f"parallelize() before fusing QKV projections or loading IP adapters, or restore the default "
                    f"processors"
                )
            else:
                swapped[module_name] = proc  # cross-attention: queries are local, K/V (text) replicated
        self.original_processors = current
        set_attention_processors(self.model, swapped)

    # -- per forward -----------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        a = bind_arguments(module, args, kwargs)
        self.state.begin_forward()
        t = self.tracker.before_forward(a.get("timestep"))
        if self.check_inputs:
            self._check_same_inputs(a.get("hidden_states"), t)
        self.family.shard_inputs(self.state, a)
        return (), a

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.state.begin_forward()
        self.tracker.after_forward()
        return output

    def _check_same_inputs(self, x: Any, t: Optional[float]) -> None:
        """Every rank must run the same step on the same latents: compare a checksum (32 bytes)."""
        comm = self.state.comm
        if comm.world == 1 or not isinstance(x, torch.Tensor):
            return
        xd = x.detach().double()
        mine = torch.stack([xd.sum(), xd.abs().sum(), xd.new_tensor(float(x.numel())),
                            xd.new_tensor(t if t is not None else 0.0)])
        every = all_gather(mine.view(1, -1), comm.group, dim=0, timeout_s=comm.timeout_s).cpu()
        ref = every[0]
        if not torch.allclose(every, ref.expand_as(every), rtol=1e-6, atol=1e-6):
            raise RuntimeError(
                "parallelize: the ranks called the transformer with different inputs (latents or timestep); "
                "give every rank the same inputs, e.g. the same generator seed"
            )

    # -- removal ---------------------------------------------------------------------------------

    def remove(self) -> None:
        """Restore the stock processors, remove the forward hooks, unwrap the pipeline (idempotent)."""
        if self.removed:
            return
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.original_processors:
            set_attention_processors(self.model, self.original_processors)
        self.tracker.unwrap_pipeline()
        self.state.begin_forward()
        self.removed = True

    def __enter__(self) -> "ParallelHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"ParallelHandle({type(self.model).__name__}, mode={self.mode!r}, world={self.state.comm.world}, "
                f"hook={type(self.hook).__name__}, removed={self.removed})")


def attention_processors(model: nn.Module) -> dict[str, Any]:
    """``{attention module name: processor}`` (DiT has no ``attn_processors``; walk the modules)."""
    return {name: m.get_processor() if hasattr(m, "get_processor") else m.processor
            for name, m in model.named_modules() if name and hasattr(m, "set_processor") and hasattr(m, "processor")}


def set_attention_processors(model: nn.Module, processors: dict[str, Any]) -> None:
    """Set each module's processor: ``set_attn_processor`` where the model has it, else per module."""
    if hasattr(model, "set_attn_processor") and len(processors) == len(getattr(model, "attn_processors", ())):
        model.set_attn_processor({f"{name}.processor": p for name, p in processors.items()})
        return
    for name, proc in processors.items():
        model.get_submodule(name).set_processor(proc)


def parallelize(
    transformer_or_pipeline: Any,
    group: Optional[dist.ProcessGroup] = None,
    mode: str = "ulysses",
    hook: HookLike = None,
    *,
    check_inputs: bool = True,
    ulysses_degree: Optional[int] = None,
    ring_degree: Optional[int] = None,
    topology: Optional[Any] = None,
) -> ParallelHandle:
    """Make a diffusers transformer (or a pipeline's) sequence parallel over ``group``.

    ``mode``: ``"ulysses"`` (all-to-all of Q/K/V/O; the head count must be divisible by the group
    size), ``"allgather"`` (all-gather of K/V, "patch parallel") or ``"ring"`` (ring exchange of K/V
    blocks merged with an online softmax) or ``"usp"`` (Ulysses inside groups of ``ulysses_degree``
    ranks, by default the ranks of one host, ring across ``ring_degree`` such groups; the product is
    the group size; see ``usp``; ``topology`` is the :class:`compact_hooks.topology.Topology` whose
    hostnames lay out the groups). ``hook`` defaults to :class:`PassthroughHook`; a config
    (dict or JSON path) is built with ``compact_hooks.build_hook``. ``group=None`` is the default
    group. Token counts that don't divide the group size are padded and masked (exact).
    ``check_inputs`` compares a checksum of the latents and timestep across ranks at every forward.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    model, pipeline = split_pipeline(transformer_or_pipeline)
    family = family_of(model)
    world, rank = group_size(group), group_rank(group)
    heads = getattr(model.config, "num_attention_heads", None)
    if mode == "ulysses" and isinstance(heads, int):
        check_heads(heads, world, type(model).__name__)
    if mode != "usp" and (ulysses_degree is not None or ring_degree is not None):
        raise ValueError(f"ulysses_degree / ring_degree are for mode='usp'; got mode={mode!r}")
    if any(isinstance(p, ParallelProcessor) for p in attention_processors(model).values()):
        raise RuntimeError(f"{type(model).__name__} is already parallelized; remove() the first handle")
    usp = None
    if mode == "usp":
        from .usp import build_usp_groups, check_degrees, check_usp_heads

        if ulysses_degree is not None and ring_degree is not None:
            check_degrees(ulysses_degree, ring_degree, world)
        check_usp_heads(heads, ulysses_degree, type(model).__name__)  # before any collective, when known
        usp = build_usp_groups(group, ulysses_degree, ring_degree, topology)
        check_usp_heads(heads, usp.ulysses_degree, type(model).__name__)
    state = ShardState(AttentionComm(resolve_hook(hook), group, world, rank, mode, usp))  # type: ignore[arg-type]
    handle = ParallelHandle(model, pipeline, family, state, check_inputs)
    try:
        handle.install()
    except BaseException:
        handle.remove()
        raise
    return handle
