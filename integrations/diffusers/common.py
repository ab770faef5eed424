"""Helpers shared by the diffusers integrations: hook resolution, pipeline unwrapping, step/request tracking."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from compact_hooks.hook import CommHook
from compact_hooks.hooks import PassthroughHook

HookLike = Union[CommHook, Mapping[str, Any], str, os.PathLike, None]


def resolve_hook(hook: HookLike) -> CommHook:
    """A CommHook from a hook, a config (path, DeepSpeed-style dict or block) or ``None`` (passthrough)."""
    if hook is None:
        return PassthroughHook()
    if isinstance(hook, CommHook):
        return hook
    if isinstance(hook, (Mapping, str, os.PathLike)):
        import compact_hooks as ch

        return ch.build_hook(ch.load_config(hook))
    raise TypeError(f"hook must be a CommHook, a config (dict or JSON path) or None; got {type(hook).__name__}")


def split_pipeline(obj: Any) -> tuple[nn.Module, Optional[Any]]:
    """``(transformer, pipeline or None)`` from a transformer or a pipeline holding one."""
    if isinstance(obj, nn.Module):
        return obj, None
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, obj
    raise TypeError(f"expected a diffusers transformer or a pipeline with a .transformer; got {type(obj).__name__}")


def bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name (``**kwargs`` flattened)."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward takes *args; cannot read its inputs by name")
        else:
            out[name] = value
    return out


def first_value(t: Any) -> Optional[float]:
    """The first timestep of a batch as a float (one host sync per step)."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class StepTracker:
    """Marks requests and steps on a hook.

    A wrapped pipeline's ``__call__`` is a request; without a pipeline a request starts when the
    timestep goes up (denoising only lowers it) and at the first forward. Each transformer forward is
    a step (:meth:`after_forward` calls ``hook.next_step()``).
    """

    def __init__(self, hook: CommHook, pipeline: Optional[Any] = None) -> None:
        self.hook = hook
        self.pipeline = pipeline
        self.pipeline_class: Optional[type] = None
        self.last_timestep: Optional[float] = None

    def begin_request(self) -> None:
        self.last_timestep = None
        self.hook.begin_request()

    def before_forward(self, timestep: Any) -> Optional[float]:
        t = first_value(timestep)
        if self.pipeline_class is None and t is not None:
            if self.last_timestep is None or t > self.last_timestep:
                self.begin_request()
            self.last_timestep = t
        return t

    def after_forward(self) -> None:
        self.hook.next_step()

    def wrap_pipeline(self) -> None:
        """Make ``pipeline(...)`` begin a request: the instance gets a same-named subclass of its class."""
        if self.pipeline is None or self.pipeline_class is not None:
            return
        cls = type(self.pipeline)
        tracker = self

        @functools.wraps(cls.__call__)  # keeps the signature visible to inspect
        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            tracker.begin_request()
            return cls.__call__(pipe, *args, **kwargs)

        attrs = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        self.pipeline_class = cls
        self.pipeline.__class__ = type(cls.__name__, (cls,), attrs)

    def unwrap_pipeline(self) -> None:
        cls = self.pipeline_class
        if self.pipeline is not None and cls is not None and type(self.pipeline).__bases__ == (cls,):
            self.pipeline.__class__ = cls
        self.pipeline_class = None
