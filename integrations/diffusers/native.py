"""Route the all-to-alls of diffusers' own Ulysses context parallelism through a CommHook.

For a model on which the user called ``model.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))``: diffusers' Ulysses attention (``TemplatedUlyssesAttention`` in
``diffusers.models.attention_dispatch``) calls the module-level ``_all_to_all_single(x, group)`` with
``x`` laid out ``[N, ...]`` (chunk j for rank j) for Q, K, V and the output: exactly the hook's
``all_to_all``. :func:`compress_native_context_parallel` replaces that function while the model runs
(other models keep the original), keys each call by the attention module that makes it
(``"transformer_blocks.3.attn:q|k|v|o"``; a call outside any attention module gets ``key=None``, the
hook's per-step call counter), marks steps and requests like ``parallelize``, and ``remove()`` puts
the original back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compact_hooks.hook import CollectiveCall, CommHook

from .common import HookLike, StepTracker, bind_arguments, resolve_hook, split_pipeline

CALL_NAMES = ("q", "k", "v", "o", "lse")


def _dispatch_module():
    from diffusers.models import attention_dispatch

    if not hasattr(attention_dispatch, "_all_to_all_single"):
        raise ImportError(
            "this diffusers has no attention_dispatch._all_to_all_single (native context parallelism needs "
            "diffusers >= 0.36); upgrade diffusers or use parallelize()"
        )
    return attention_dispatch


def _check_config(model: nn.Module) -> None:
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        raise ValueError(
            f"{type(model).__name__} has no native context parallelism; call model.enable_parallelism("
            f"config=ContextParallelConfig(ulysses_degree=N)) first, or use parallelize()"
        )
    if getattr(cp, "ring_degree", 1) > 1:
        raise ValueError(
            "compress_native_context_parallel routes Ulysses all-to-alls only; ring_degree > 1 (ring K/V "
            "exchange) is not intercepted: use ContextParallelConfig(ulysses_degree=N) or parallelize(mode='ring')"
        )
    if getattr(cp, "ulysses_anything", False):
        raise ValueError(
            "ulysses_anything=True uses uneven all-to-alls that the hook cannot route; use equal shards "
            "(sequence divisible by ulysses_degree) or parallelize(), which pads and masks"
        )


class NativeHandle:
    """The interception installed by :func:`compress_native_context_parallel`; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, pipeline: Optional[Any], hook: CommHook) -> None:
        self.model = model
        self.hook = hook
        self.tracker = StepTracker(hook, pipeline)
        self.hooks: list[RemovableHandle] = []
        self.active = False
        self.current: Optional[str] = None
        self.calls = 0
        self.module: Any = None
        self.previous: Optional[Callable[..., torch.Tensor]] = None
        self.routed: Optional[Callable[..., torch.Tensor]] = None
        self.removed = False

    def _key(self) -> Optional[str]:
        if self.current is None:
            return None
        i = self.calls
        self.calls += 1
        return f"{self.current}:{CALL_NAMES[i] if i < len(CALL_NAMES) else f'a2a{i}'}"

    def install(self) -> None:
        module = _dispatch_module()
        previous = module._all_to_all_single

        def routed(x: torch.Tensor, group: Any) -> torch.Tensor:
            if not self.active:
                return previous(x, group)
            return self.hook(CollectiveCall("all_to_all", x, group, key=self._key()))

        self.module, self.previous, self.routed = module, previous, routed
        module._all_to_all_single = routed

        for name, sub in self.model.named_modules():
            if name and hasattr(getattr(sub, "processor", None), "_parallel_config"):
                self.hooks.append(sub.register_forward_pre_hook(self._enter_attention(name)))
                self.hooks.append(sub.register_forward_hook(self._leave_attention))
        self.hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self.hooks.append(self.model.register_forward_hook(self._after_forward))
        self.tracker.wrap_pipeline()

    def _enter_attention(self, name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            self.current, self.calls = name, 0

        return pre

    def _leave_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current = None

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.tracker.before_forward(bind_arguments(module, args, kwargs).get("timestep"))
        self.active = True

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.active = False
        self.current = None
        self.tracker.after_forward()

    def begin_request(self) -> None:
        self.tracker.begin_request()

    def remove(self) -> None:
        """Restore ``_all_to_all_single``, remove the module hooks, unwrap the pipeline (idempotent)."""
        if self.removed:
            return
        if self.module is not None:
            if self.module._all_to_all_single is not self.routed:
                raise RuntimeError(
                    "another compress_native_context_parallel() was installed after this one; remove() it first"
                )
            self.module._all_to_all_single = self.previous
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.tracker.unwrap_pipeline()
        self.active = False
        self.removed = True

    def __enter__(self) -> "NativeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def compress_native_context_parallel(model_or_pipeline: Any, hook: HookLike = None) -> NativeHandle:
    """Route the Ulysses all-to-alls of diffusers' ``enable_parallelism`` through ``hook``.

    Call it after ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``; pass the
    pipeline to have each ``pipe(...)`` begin a request. Returns a handle with ``remove()``.
    """
    model, pipeline = split_pipeline(model_or_pipeline)
    _check_config(model)
    handle = NativeHandle(model, pipeline, resolve_hook(hook))
    try:
        handle.install()
    except BaseException:
        handle.remove()
        raise
    return handle
