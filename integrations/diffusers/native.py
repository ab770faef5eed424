"""Route every collective of diffusers' own context parallelism through a CommHook.

For a model on which the user called ``model.enable_parallelism(config=ContextParallelConfig(...))``
(any diffusers transformer with a ``_cp_plan``: Flux, Flux2, Wan, QwenImage, LTX, ...), with any layout
diffusers supports: Ulysses (``ulysses_degree``), ring (``ring_degree``: one all-gather of the
concatenated K/V per attention), unified Ulysses x ring (both), and the uneven ``ulysses_anything`` /
``ring_anything``. :func:`compress_native_context_parallel` stands in for the collectives diffusers
calls (see :mod:`.native_routes`) while this model's forward runs (other models keep the originals),
keys each call by the attention module and what it carries (``"transformer_blocks.3.attn:q|k|v|o|lse|kv"``),
marks steps and requests like ``parallelize``, counts what it routed, did exactly (the output gather)
and left alone (``stats()["unrouted"]``), and ``remove()`` puts everything back.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.utils.hooks import RemovableHandle

from compact_hooks.hook import CommHook

from .common import HookLike, StepTracker, bind_arguments, resolve_hook, split_pipeline
from .native_routes import A2A_ROLES, Router

CALL_NAMES = A2A_ROLES


def _diffusers_modules() -> tuple[Any, Any, Any]:
    from diffusers.models import attention_dispatch

    if not hasattr(attention_dispatch, "_all_to_all_single"):
        raise ImportError(
            "this diffusers has no attention_dispatch._all_to_all_single (native context parallelism needs "
            "diffusers >= 0.36); upgrade diffusers or use parallelize()"
        )
    from diffusers.hooks import context_parallel
    from diffusers.models import _modeling_parallel

    return attention_dispatch, context_parallel, _modeling_parallel


def context_parallel_config(model: nn.Module) -> Any:
    """The model's ``ContextParallelConfig`` (a ``ValueError`` saying what to call when there is none)."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        raise ValueError(
            f"{type(model).__name__} has no native context parallelism; call model.enable_parallelism("
            f"config=ContextParallelConfig(ulysses_degree=U, ring_degree=R)) first, or use parallelize()"
        )
    return cp


class NativeHandle:
    """The interception installed by :func:`compress_native_context_parallel`; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, pipeline: Optional[Any], hook: CommHook) -> None:
        self.model = model
        self.hook = hook
        self.router = Router(hook)
        self.tracker = StepTracker(hook, pipeline)
        self.hooks: list[RemovableHandle] = []
        self.patches: list[tuple[Any, str, Any, Any]] = []  # (module, name, previous, ours)
        self.removed = False

    @property
    def active(self) -> bool:
        return self.router.active

    def _patch(self, module: Any, name: str, make: Any) -> None:
        previous = getattr(module, name)
        ours = make(previous)
        setattr(module, name, ours)
        self.patches.append((module, name, previous, ours))

    def install(self) -> None:
        dispatch, context_parallel, modeling_parallel = _diffusers_modules()
        r = self.router
        self._patch(dispatch, "_all_to_all_single", r.a2a_function)
        self._patch(dispatch, "funcol", r.funcol_proxy)
        self._patch(dispatch, "dist", r.dist_proxy)
        self._patch(context_parallel, "funcol", r.funcol_proxy)
        self._patch(context_parallel, "dist", r.dist_proxy)
        self._patch(modeling_parallel, "dist", r.dist_proxy)

        for name, sub in self.model.named_modules():
            if name and hasattr(getattr(sub, "processor", None), "_parallel_config"):
                self.hooks.append(sub.register_forward_pre_hook(self._enter_attention(name)))
                self.hooks.append(sub.register_forward_hook(self._leave_attention))
        self.hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self.hooks.append(self.model.register_forward_hook(self._after_forward))
        self.tracker.wrap_pipeline()

    def _enter_attention(self, name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            self.router.enter(name)

        return pre

    def _leave_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.router.leave()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.tracker.before_forward(bind_arguments(module, args, kwargs).get("timestep"))
        self.router.active = True

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.router.active = False
        self.router.leave()
        self.tracker.after_forward()

    def begin_request(self) -> None:
        self.tracker.begin_request()

    def stats(self) -> dict[str, Any]:
        """The hook's ``stats()`` plus the call counters: ``routed`` (through the hook), ``exact`` (the output
        gather, plain), ``unrouted`` (took torch.distributed unchanged; ``unrouted_ops`` by name)."""
        return {**self.hook.stats(), **self.router.stats()}

    def remove(self) -> None:
        """Restore diffusers' collectives, remove the module hooks, unwrap the pipeline (idempotent)."""
        if self.removed:
            return
        for module, name, _previous, ours in self.patches:
            if getattr(module, name) is not ours:
                raise RuntimeError(
                    "another compress_native_context_parallel() was installed after this one; remove() it first"
                )
        for module, name, previous, _ours in reversed(self.patches):
            setattr(module, name, previous)
        self.patches = []
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.tracker.unwrap_pipeline()
        self.router.active = False
        self.removed = True

    def __enter__(self) -> "NativeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def compress_native_context_parallel(model_or_pipeline: Any, hook: HookLike = None) -> NativeHandle:
    """Route every collective of diffusers' ``enable_parallelism`` context parallelism through ``hook``.

    Call it after ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))``
    (``ulysses_anything`` / ``ring_anything`` too); pass the pipeline to have each ``pipe(...)`` begin a
    request. Returns a handle with ``stats()`` and ``remove()``.
    """
    model, pipeline = split_pipeline(model_or_pipeline)
    context_parallel_config(model)
    handle = NativeHandle(model, pipeline, resolve_hook(hook))
    try:
        handle.install()
    except BaseException:
        handle.remove()
        raise
    return handle
