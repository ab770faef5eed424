"""torch's functional collectives routed through a CommHook, keyed by the attention module that calls them.

xDiT's USP (``xfuser/model_executor/layers/usp.py``) and torch's templated ring attention
(``torch.distributed.tensor.experimental._context_parallel._attention``) move their data with
``torch.distributed._functional_collectives`` (``funcol``), whose results are
``AsyncCollectiveTensor``\\ s waited on at their first non-view use:

* ``all_to_all_single(x, None, None, group)`` (equal splits: Ulysses' Q, K, V and output): the
  hook's ``all_to_all``;
* ``all_gather_single`` / ``all_gather_tensor(x, dim, group)`` (the ring's one K/V all-gather,
  ``_RotateMethod.ALL_GATHER``, torch's default): the hook's ``all_gather``;
* ``permute_tensor(x, src_dst, group)`` when ``src_dst`` is the rotation ``m -> m + 1`` of a flat
  ``x`` (the ring's K/V shift, ``_RotateMethod.ALL_TO_ALL``): the hook's ``ring_exchange``.

:func:`route_functional_collectives` replaces, in each module of ``modules`` (default: torch's ring
attention module), every global bound to ``funcol`` by a stand-in and every global bound to one of
its collectives by the routed function; forward pre- and post-hooks on the model's attention
modules say which module is calling. Inside an attention forward a routed call goes to
``hook.start`` with the key ``<module name>:<role>``: all-to-alls take ``q, k, v, o, lse`` in call
order (a role hint from an integration overrides it, see :meth:`FuncolRouter.hint`), the gather is
``kv``, the ring shift's hops ``kv.hop1``, ``kv.hop2``, ...; a repeat gets a number (``kv2``).
The result is an ``AsyncCollectiveTensor`` over a buffer with a c10d ``Work`` registered for it, so
the caller's first non-view use (or ``.wait()``) waits on the hook's work, as with funcol itself.

Everything else takes funcol unchanged and is counted: non-float tensors (FP8 comms, int sizes) as
``exact``; other collectives, uneven splits, other permutations, groups that are not one process
group and routed names called outside an attention forward as ``unrouted`` (``unrouted_ops`` says
which). Nothing is routed once the handle is removed.
"""

from __future__ import annotations

import importlib
import threading
import types
from collections import Counter
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.work import CollectiveWork, wait_on_use

__all__ = ["FuncolHandle", "FuncolRouter", "RING_ATTENTION_MODULE", "route_functional_collectives"]

RING_ATTENTION_MODULE = "torch.distributed.tensor.experimental._context_parallel._attention"
ROLES: dict[str, tuple[str, ...]] = {"a2a": ("q", "k", "v", "o", "lse"), "in": ("q", "k", "v"), "qkv": ("qkv",),
                                     "out": ("o",), "kv": ("kv",)}
ROUTED = ("all_to_all_single", "all_gather_single", "all_gather_tensor", "permute_tensor")
COLLECTIVES = frozenset({
    *ROUTED, "all_gather_tensor_autograd", "all_gather_single_autograd", "all_gather_into_tensor_coalesced",
    "all_gather_single_coalesced", "all_to_all_single_autograd", "all_reduce", "all_reduce_coalesced",
    "reduce_scatter_tensor", "reduce_scatter_tensor_autograd", "reduce_scatter_single",
    "reduce_scatter_single_autograd", "reduce_scatter_tensor_coalesced", "reduce_scatter_single_coalesced",
    "broadcast"})
COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
AttentionSelector = Union[Callable[[str, nn.Module], bool], tuple[type, ...], type]


def lazy_tensor(work: CollectiveWork, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An ``AsyncCollectiveTensor`` of ``shape`` that waits on ``work`` at its first non-view use."""
    if work.is_completed():
        return funcol.AsyncCollectiveTensor(work.wait())
    return wait_on_use(work, shape, like)


def _process_group(group: Any) -> Optional[dist.ProcessGroup]:
    """The process group of a funcol ``group`` argument (a process group or a 1-D mesh), else None."""
    if isinstance(group, dist.ProcessGroup):
        return group
    mesh_type = getattr(importlib.import_module("torch.distributed.device_mesh"), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type) and group.ndim == 1:
        return group.get_group()
    return None


class RouteCounts:
    """What a router of collectives counts while ``active``: ``routed`` (through the hook), ``exact``
    (plain, on purpose) and ``unrouted`` (torch.distributed unchanged; ``unrouted_ops`` by name)."""

    def __init__(self, hook: CommHook) -> None:
        self.hook = hook
        self.active = False
        self.counts: Counter[str] = Counter()
        self.unrouted_ops: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return {"routed": self.counts["routed"], "exact": self.counts["exact"],
                "unrouted": self.counts["unrouted"], "unrouted_ops": dict(self.unrouted_ops)}

    def _plain(self, name: str, real: Callable[..., Any], counter: str, *args: Any, **kwargs: Any) -> Any:
        """``real(*args, **kwargs)``, counted (while active) as ``counter``, and as ``name`` when unrouted."""
        if self.active:
            self.counts[counter] += 1
            if counter == "unrouted":
                self.unrouted_ops[name] += 1
        return real(*args, **kwargs)

    def unrouted(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        """``real``, counted as the unrouted op ``name`` while active."""
        return lambda *args, **kwargs: self._plain(name, real, "unrouted", *args, **kwargs)


class CollectiveProxy:
    """A module stand-in (``funcol``, ``torch.distributed``): ``routes`` by name, the other
    ``collectives`` counted as unrouted (``<prefix>.<name>``), the rest of ``real`` as is."""

    def __init__(self, real: Any, routes: dict[str, Callable[..., Any]], collectives: frozenset[str],
                 router: RouteCounts, prefix: str) -> None:
        self._real, self._routes, self._collectives = real, routes, collectives
        self._router, self._prefix = router, prefix

    def __getattr__(self, name: str) -> Any:
        if name in self._routes:
            return self._routes[name]
        value = getattr(self._real, name)
        if name in self._collectives and callable(value):
            return self._router.unrouted(f"{self._prefix}.{name}", value)
        return value


class FuncolRouter(RouteCounts):
    """The routed functional collectives: keys, role hints and the ``routed`` / ``exact`` / ``unrouted`` counts."""

    def __init__(self, hook: CommHook) -> None:
        super().__init__(hook)
        self._local = threading.local()  # .frames: [(name, role counter)], innermost last; .hints

    # -- keys ----------------------------------------------------------------------------------

    def _frames(self) -> list[tuple[str, Counter[str]]]:
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = []
        return frames

    def enter(self, name: str) -> None:
        self._frames().append((name, Counter()))

    def leave(self) -> None:
        frames = self._frames()
        if frames:
            frames.pop()

    def inside(self) -> bool:
        return bool(self._frames())

    def hint(self, kind: str) -> "_Hint":
        """``with router.hint("out"):``: the all-to-alls inside take that kind's roles (``in``: q, k, v;
        ``qkv``; ``out``: o) instead of the call-order default."""
        if kind not in ROLES:
            raise ValueError(f"role kind must be one of {', '.join(ROLES)}; got {kind!r}")
        return _Hint(self, kind)

    def _hint(self) -> Optional[str]:
        hints = getattr(self._local, "hints", None)
        return hints[-1] if hints else None

    def key(self, kind: str) -> str:
        """``<module>:<role>`` of the next call of ``kind`` in the innermost attention forward."""
        name, counter = self._frames()[-1]
        n = counter[kind]
        counter[kind] += 1
        roles = ROLES.get(kind, ())
        return f"{name}:{roles[n] if n < len(roles) else f'{kind}{n + 1}'}"

    # -- the calls -----------------------------------------------------------------------------

    def _routable(self, name: str, x: torch.Tensor, group: Any) -> tuple[Optional[dist.ProcessGroup], str]:
        """The process group when ``name`` may go to the hook, else why not (``exact`` / ``unrouted`` op)."""
        if not self.active:
            return None, ""
        if not self.inside():
            return None, f"{name} (outside an attention module)"
        pg = _process_group(group)
        if pg is None:
            return None, f"{name} (group {type(group).__name__})"
        if x.dtype not in COMPRESSIBLE:
            return None, "exact"
        return pg, ""

    def _start(self, op: str, x: torch.Tensor, pg: dist.ProcessGroup, key: str, shape: Sequence[int],
               dim: int = 0) -> torch.Tensor:
        self.counts["routed"] += 1
        work = self.hook.start(CollectiveCall(op, x, pg, key=key, dim=dim))  # type: ignore[arg-type]
        return lazy_tensor(work, shape, x)

    def all_to_all_single(self, x: torch.Tensor, output_split_sizes: Optional[Sequence[int]],
                          input_split_sizes: Optional[Sequence[int]], group: Any, tag: str = "") -> torch.Tensor:
        real = funcol.all_to_all_single
        args = (x, output_split_sizes, input_split_sizes, group, tag)
        pg, why = self._routable("all_to_all_single", x, group)
        if pg is None:
            return self._plain(why, real, "exact" if why == "exact" else "unrouted", *args)
        size = dist.get_world_size(pg)
        even = [x.shape[0] // size] * size if x.dim() else []
        if x.dim() == 0 or x.shape[0] % size or any(
                s is not None and list(s) != even for s in (output_split_sizes, input_split_sizes)):
            return self._plain("all_to_all_single (uneven splits)", real, "unrouted", *args)
        return self._start("all_to_all", x.contiguous(), pg, self.key(self._hint() or "a2a"), x.shape)

    def all_gather_single(self, x: torch.Tensor, gather_dim: int, group: Any, tag: str = "") -> torch.Tensor:
        pg, why = self._routable("all_gather_single", x, group)
        if pg is None:
            return self._plain(why, funcol.all_gather_single, "exact" if why == "exact" else "unrouted",
                               x, gather_dim, group, tag)
        shape = list(x.shape)
        shape[gather_dim] *= dist.get_world_size(pg)
        return self._start("all_gather", x.contiguous(), pg, self.key("kv"), shape, dim=gather_dim)

    def permute_tensor(self, x: torch.Tensor, src_dst: Sequence[int], group: Any, tag: str = "") -> torch.Tensor:
        pg, why = self._routable("permute_tensor", x, group)
        if pg is None:
            return self._plain(why, funcol.permute_tensor, "exact" if why == "exact" else "unrouted",
                               x, src_dst, group, tag)
        size = dist.get_world_size(pg)
        if x.dim() != 1 or list(src_dst) != [(m + 1) % size for m in range(size)]:
            return self._plain("permute_tensor (not a flat shift to the next rank)", funcol.permute_tensor,
                               "unrouted", x, src_dst, group, tag)
        name, counter = self._frames()[-1]
        counter["hop"] += 1
        return self._start("ring_exchange", x.contiguous(), pg, f"{name}:kv.hop{counter['hop']}", x.shape)

    def function(self, name: str) -> Callable[..., Any]:
        """The stand-in of funcol's ``name``: routed, or the real one counted as unrouted while active."""
        if name in ("all_gather_single", "all_gather_tensor"):
            return self.all_gather_single
        if name in ROUTED:
            return getattr(self, name)
        real = getattr(funcol, name)
        return self.unrouted(f"funcol.{name}", real) if name in COLLECTIVES else real


class _Hint:
    def __init__(self, router: FuncolRouter, kind: str) -> None:
        self.router, self.kind = router, kind

    def __enter__(self) -> None:
        hints = getattr(self.router._local, "hints", None)
        if hints is None:
            hints = self.router._local.hints = []
        hints.append(self.kind)

    def __exit__(self, *exc: Any) -> None:
        self.router._local.hints.pop()


class _FuncolProxy(CollectiveProxy):
    """``funcol`` as a caller module sees it: routed names from the router, the rest from funcol."""

    def __init__(self, router: FuncolRouter) -> None:
        super().__init__(funcol, {name: router.function(name) for name in ROUTED}, COLLECTIVES, router, "funcol")


def _attention_modules(model: nn.Module, attention: Optional[AttentionSelector]) -> list[tuple[str, nn.Module]]:
    if attention is None:
        def chosen(name: str, module: nn.Module) -> bool:
            return type(module).__name__.endswith("Attention")
    elif isinstance(attention, (type, tuple)):
        types_ = attention

        def chosen(name: str, module: nn.Module) -> bool:
            return isinstance(module, types_)
    else:
        chosen = attention
    found = [(name, m) for name, m in model.named_modules() if name and chosen(name, m)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module to key the collectives by (by default "
                         f"a submodule whose class name ends with 'Attention'): pass attention=<types or "
                         f"predicate(name, module)>")
    return found


class FuncolHandle:
    """The routing of :func:`route_functional_collectives`: ``stats()``, ``remove()``, a context manager."""

    def __init__(self, router: FuncolRouter, swaps: list[tuple[types.ModuleType, str, Any, Any]],
                 handles: list[Any]) -> None:
        self.router, self._swaps, self._handles = router, swaps, handles

    @property
    def hook(self) -> CommHook:
        return self.router.hook

    def swap(self, module: types.ModuleType, name: str, stand_in: Any) -> None:
        """Replace ``module.name`` by ``stand_in`` until :meth:`remove` (integrations: role hints)."""
        self._swaps.append((module, name, getattr(module, name), stand_in))
        setattr(module, name, stand_in)

    def stats(self) -> dict[str, Any]:
        """``hook.stats()`` with ``routed``, ``exact``, ``unrouted`` and ``unrouted_ops`` added."""
        return {**self.hook.stats(), **self.router.stats()}

    def remove(self) -> None:
        """Put every swapped name back and drop the module hooks; raises if a later routing of the
        same names is still installed (remove that one first)."""
        if not self.router.active:
            return
        for module, name, _, stand_in in self._swaps:
            if module.__dict__.get(name) is not stand_in:
                raise RuntimeError(f"{module.__name__}.{name} was replaced after this routing was installed: "
                                   f"remove the later routing first")
        for module, name, original, _ in reversed(self._swaps):
            setattr(module, name, original)
        for handle in self._handles:
            handle.remove()
        self.router.active = False

    def __enter__(self) -> "FuncolHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _resolve(module: Union[str, types.ModuleType]) -> types.ModuleType:
    if isinstance(module, types.ModuleType):
        return module
    if not isinstance(module, str):
        raise TypeError(f"modules must hold modules or module names; got {type(module).__name__}")
    return importlib.import_module(module)


def route_functional_collectives(hook: CommHook, model: nn.Module,
                                 modules: Iterable[Union[str, types.ModuleType]] = (RING_ATTENTION_MODULE,),
                                 attention: Optional[AttentionSelector] = None,
                                 router: Optional[FuncolRouter] = None) -> FuncolHandle:
    """Route the functional collectives that ``modules`` make while ``model``'s attention modules run
    through ``hook`` (use the handle as a context manager, or call ``remove()``).

    ``modules``: the modules whose global ``funcol`` (any name bound to
    ``torch.distributed._functional_collectives``, or to one of its collectives) is swapped; add the
    module of your own attention code. ``attention``: which submodules key the calls (types, or a
    predicate ``(name, module) -> bool``; default: class name ending with ``Attention``).
    """
    if not isinstance(hook, CommHook):
        raise TypeError(f"hook must be a CommHook (e.g. compact_hooks.build_hook(config)); got {type(hook).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    router = router or FuncolRouter(hook)
    found = _attention_modules(model, attention)
    proxy = _FuncolProxy(router)
    swaps: list[tuple[types.ModuleType, str, Any, Any]] = []
    for module in map(_resolve, modules):
        for name, value in list(vars(module).items()):
            if value is funcol or isinstance(value, _FuncolProxy):
                swaps.append((module, name, value, proxy))
            elif callable(value) and getattr(value, "__module__", None) == funcol.__name__ and \
                    getattr(value, "__name__", None) in COLLECTIVES:
                swaps.append((module, name, value, router.function(value.__name__)))
    handles: list[Any] = []
    for name, module in found:
        handles.append(module.register_forward_pre_hook(lambda m, args, _n=name: router.enter(_n)))
        handles.append(module.register_forward_hook(lambda m, args, out: router.leave(), always_call=True))
    for module, name, _, stand_in in swaps:
        setattr(module, name, stand_in)
    router.active = True
    return FuncolHandle(router, swaps, handles)
