"""Rank programs of tests/test_funcol.py: torch's templated ring attention, a Ulysses attention written
with functional collectives and xfuser's USP, with and without the functional-collectives route."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from compact_hooks.integrations.funcol import RING_ATTENTION_MODULE, route_functional_collectives
from torch import nn

import compact_hooks as ch
from compact_hooks.bench.xfuser_check import import_usp, setup_xfuser

HOOKS: dict[str, dict[str, Any]] = {
    "none": {"compressor": "none", "warmup_compressor": None},
    "int8": {"compressor": "int8", "residual": "ef"},
    "int2": {"compressor": "int2", "residual": "ef"},
}
HEADS, DIM, WIDTH = 4, 16, 64


def _ring() -> Any:
    return importlib.import_module(RING_ATTENTION_MODULE)


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
               **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring's attention op on CPU: (out, log-sum-exp) of torch's CPU flash kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=bool(is_causal))
    return out, lse


class RingAttention(nn.Module):
    """torch's ``_templated_ring_attention`` over ``group`` (q, k, v: [B, H, S_local, D])."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, *_ = _ring()._templated_ring_attention(self.group, 2, _cpu_flash, q, k, v, is_causal=False)
        return out


class UlyssesAttention(nn.Module):
    """Ulysses written with ``funcol.all_to_all_single`` (the layout of xfuser's ``_ft_c_*_all_to_all``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def _a2a(self, x: torch.Tensor) -> torch.Tensor:
        out = funcol.all_to_all_single(x.contiguous(), None, None, self.group)
        return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = dist.get_world_size(self.group)
        b, h, s, d = q.shape

        def scatter_heads(x: torch.Tensor) -> torch.Tensor:  # [B, H, S/P, D] -> [B, H/P, S, D]
            x = self._a2a(x.permute(1, 0, 2, 3))
            return x.reshape(p, h // p, b, s, d).permute(2, 1, 0, 3, 4).reshape(b, h // p, p * s, d)

        out = F.scaled_dot_product_attention(scatter_heads(q), scatter_heads(k), scatter_heads(v))
        out = self._a2a(out.permute(2, 0, 1, 3))  # [S, B, H/P, D]: chunk j = rank j's tokens
        return out.reshape(p, s, b, h // p, d).permute(2, 0, 3, 1, 4).reshape(b, h, s, d)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, HEADS, DIM).permute(2, 0, 3, 1, 4)
        return x + self.proj(self.attn(q, k, v).transpose(1, 2).reshape(b, s, WIDTH))


class Net(nn.Module):
    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(make()) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Single(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def _inputs(steps: int, tokens: int) -> list[torch.Tensor]:
    """A slowly changing activation per step (a denoising trajectory's stand-in), full sequence."""
    g = torch.Generator().manual_seed(1)
    base, drift = torch.randn(1, tokens, WIDTH, generator=g), torch.randn(1, tokens, WIDTH, generator=g)
    return [base + 0.05 * s * drift for s in range(steps)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@contextlib.contextmanager
def _rotate(method: str) -> Iterator[None]:
    opts = _ring()._cp_options
    saved = (opts.rotate_method, opts.enable_load_balance)
    opts.rotate_method = getattr(_ring()._RotateMethod, method)
    opts.enable_load_balance = False
    try:
        yield
    finally:
        opts.rotate_method, opts.enable_load_balance = saved


def _row(outs: list[torch.Tensor], plain: list[torch.Tensor], st: dict[str, Any]) -> dict[str, Any]:
    """One hooked run against the plain run: equal?, errors, the routing counters, ratio and keys."""
    return {"equal": all(torch.equal(o, p) for o, p in zip(outs, plain)),
            "errs": [_rel(o, p) for o, p in zip(outs, plain)],
            "routed": st["routed"], "unrouted": st["unrouted"], "exact": st["exact"],
            "unrouted_ops": st["unrouted_ops"], "ratio": st.get("compression_ratio"),
            "keys": sorted(st.get("per_key", {}))}


def _run(net: nn.Module, xs: list[torch.Tensor], hook: Any = None, modules: tuple = ()) -> tuple[list, dict]:
    if hook is None:
        with torch.no_grad():
            return [net(x) for x in xs], {}
    outs = []
    with route_functional_collectives(hook, net, modules=modules) as handle, torch.no_grad():
        for x in xs:
            outs.append(net(x))
            hook.next_step()
        return outs, handle.stats()


def table_worker(rank: int, world: int, steps: int, tokens: int) -> dict[str, Any]:
    """Per layout: the plain run vs one process, then each hook's outputs against the plain run."""
    group = dist.new_group(list(range(world)))
    xs = _inputs(steps, tokens)
    shard = tokens // world
    local = [x[:, rank * shard:(rank + 1) * shard] for x in xs]
    here = importlib.import_module(__name__)
    layouts: dict[str, tuple[Callable[[], nn.Module], tuple, str]] = {
        "ring_gather": (lambda: RingAttention(group), (RING_ATTENTION_MODULE,), "ALL_GATHER"),
        "ring_permute": (lambda: RingAttention(group), (RING_ATTENTION_MODULE,), "ALL_TO_ALL"),
        "ulysses": (lambda: UlyssesAttention(group), (here,), "ALL_GATHER"),
    }
    single = Net(_Single)
    with torch.no_grad():
        full = [single(x)[:, rank * shard:(rank + 1) * shard] for x in xs]
    rows: dict[str, Any] = {}
    for layout, (make, modules, method) in layouts.items():
        with _rotate(method):
            net = Net(make)
            net.load_state_dict(single.state_dict())
            plain, _ = _run(net, local)
            rows[f"{layout}/single"] = {"err": max(_rel(p, f) for p, f in zip(plain, full))}
            hooks = {"passthrough": ch.PassthroughHook(), **{n: ch.build_hook(c) for n, c in HOOKS.items()}}
            for name, hook in hooks.items():
                outs, st = _run(net, local, hook, modules)
                rows[f"{layout}/{name}"] = _row(outs, plain, st)
    return rows


def lazy_worker(rank: int, world: int) -> dict[str, Any]:
    """A routed gather comes back as an AsyncCollectiveTensor whose hook work is still outstanding,
    and its first non-view use waits on it. Rank 1 joins the gather only after rank 0 looked, so
    rank 0's work cannot have completed (a second group carries the go signal)."""
    group, signal = dist.new_group([0, 1]), dist.new_group([0, 1])
    hook = ch.PassthroughHook()
    x = torch.arange(6.0).reshape(2, 3) + 10 * rank

    class ProbeAttention(nn.Module):
        def forward(self, t: torch.Tensor) -> Any:
            return _ring().ft_c.all_gather_single(t, 0, group)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = ProbeAttention()

    model = Holder()
    res: dict[str, Any] = {}
    with route_functional_collectives(hook, model) as handle:
        flag = torch.zeros(1)
        if rank == 1:
            dist.recv(flag, 0, group=signal)
        out = model.attn(x)
        res["type"] = type(out).__name__
        res["outstanding_before"] = hook.outstanding_keys()
        view = out.view(-1)
        res["view_type"] = type(view).__name__
        res["outstanding_after_view"] = hook.outstanding_keys()
        if rank == 0:
            dist.send(flag, 1, group=signal)
        used = out + 0  # first non-view use
        res["outstanding_after_use"] = hook.outstanding_keys()
        res["used"] = used.tolist()
        res["wait"] = out.wait().tolist()
        res["stats"] = handle.router.stats()
    return res


def unrouted_worker(rank: int, world: int) -> dict[str, Any]:
    """Calls that are not routed are counted (and run): a reduce, a reverse permutation, a gather outside
    an attention; none after remove()."""
    group = dist.new_group([0, 1])
    hook = ch.PassthroughHook()
    x = torch.ones(4) * (rank + 1)

    class OddAttention(nn.Module):
        def forward(self, t: torch.Tensor) -> list[torch.Tensor]:
            ft = _ring().ft_c
            return [ft.all_reduce(t, "sum", group), ft.permute_tensor(t, [0, 1], group),
                    ft.all_gather_single(t.to(torch.int64), 0, group)]

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = OddAttention()

    model = Holder()
    ring = _ring()
    original = ring.ft_c
    with route_functional_collectives(hook, model) as handle:
        outs = [o.wait() if isinstance(o, funcol.AsyncCollectiveTensor) else o for o in model.attn(x)]
        ring.ft_c.all_gather_single(x, 0, group).wait()  # outside an attention module
        st = dict(handle.router.stats())
    restored = ring.ft_c is original
    model.attn(x)
    return {"stats": st, "after": handle.router.stats(), "restored": restored,
            "values": [o.tolist() for o in outs]}


# -- xfuser ------------------------------------------------------------------------------------------


class XfuserAttention(nn.Module):
    def __init__(self, usp: Any, combine: bool) -> None:
        super().__init__()
        self.usp, self.combine = usp, combine

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.usp.USP(q, k, v, combine_qkv_a2a=self.combine)


def xfuser_worker(rank: int, world: int, ulysses: int, ring: int, steps: int, tokens: int) -> dict[str, Any]:
    """xfuser's USP (Ulysses ``ulysses`` x ring ``ring``) plain, then through each hook."""
    from compact_hooks.integrations.xfuser import compress_xfuser
    from compact_hooks.integrations.yunchang import cpu_flash_attention

    usp = import_usp("cpu")
    setup_xfuser(usp, ulysses, ring)
    xs = _inputs(steps, tokens)
    shard = tokens // world
    local = [x[:, rank * shard:(rank + 1) * shard] for x in xs]
    single = Net(_Single)
    with torch.no_grad():
        full = [single(x)[:, rank * shard:(rank + 1) * shard] for x in xs]
    rows: dict[str, Any] = {}
    with cpu_flash_attention(), _rotate("ALL_GATHER"):
        for combine in (False, True):
            net = Net(lambda: XfuserAttention(usp, combine))
            net.load_state_dict(single.state_dict())
            plain, _ = _run(net, local)
            tag = "combined" if combine else "separate"
            rows[f"{tag}/single"] = {"err": max(_rel(p, f) for p, f in zip(plain, full))}
            hooks = {"passthrough": ch.PassthroughHook(), **{n: ch.build_hook(c) for n, c in HOOKS.items()}}
            for name, hook in hooks.items():
                outs = []
                with compress_xfuser(hook, net, usp=usp) as handle, torch.no_grad():
                    for x in local:
                        outs.append(net(x))
                        hook.next_step()
                    st = handle.stats()
                rows[f"{tag}/{name}"] = _row(outs, plain, st)
    return rows
