"""Rank functions of the yunchang tests: yunchang's own attention layers, with and without the hook."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.hooks import CompactHook, PassthroughHook
from compact_hooks.topology import group_ranks

B, S, H, D = 2, 32, 4, 16
DRIFT = 0.05  # per-step change of q/k/v relative to their size (adjacent denoising steps)


class Recorder(CommHook):
    def __init__(self, inner: CommHook) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        self.calls.append((call.op, str(call.key), group_ranks(call.group)))
        return self.inner(call)

    def next_step(self) -> None:
        self.inner.next_step()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


def _inputs(step: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    drift = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    return tuple(x + DRIFT * step * d for x, d in zip(base, drift))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = x.shape[1] // world
    return x[:, rank * n:(rank + 1) * n].contiguous()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref))


def yunchang_worker(rank: int, world: int, layouts: list[tuple[int, int]]) -> dict[str, Any]:
    """Per (ulysses, ring) layout and layer: yunchang's output with and without the hook, keys, groups,
    and an int2 error-feedback run over drifting inputs."""
    torch.set_num_threads(1)
    import yunchang
    from compact_hooks.integrations.yunchang import YunchangHooks, cpu_flash_attention, hook_yunchang
    from yunchang import LongContextAttention, UlyssesAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    out: dict[str, Any] = {"version": yunchang.__version__}
    with cpu_flash_attention() as registered:
        out["registered_cpu_kernel"] = registered
        for u, r in layouts:
            set_seq_parallel_pg(u, r, rank, world)
            uly, ring = group_ranks(PROCESS_GROUP.ULYSSES_PG), group_ranks(PROCESS_GROUP.RING_PG)
            layers = {
                "long_basic_pytorch": lambda: LongContextAttention(ring_impl_type="basic_pytorch",
                                                                   attn_type=AttnType.TORCH_FLASH),
                "long_basic": lambda: LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_FLASH),
            }
            if r == 1:
                layers["ulysses"] = lambda: UlyssesAttention(PROCESS_GROUP.ULYSSES_PG, attn_type=AttnType.TORCH_FLASH)
            q, k, v = _inputs()
            ql, kl, vl = (_shard(x, rank, world) for x in (q, k, v))
            ref = _shard(_reference(q, k, v), rank, world)
            for name, make in layers.items():
                attn = make()
                with torch.no_grad():
                    own = attn(ql, kl, vl)
                    rec = Recorder(PassthroughHook())
                    with YunchangHooks(rec) as hooks:
                        hooks.attach(attn, "blocks.0.attn")
                        hooked = attn(ql, kl, vl)
                    after = attn(ql, kl, vl)  # removed: yunchang's own path again
                calls = sorted({(op, key.split(":", 1)[1].split(".")[0], ranks == uly, ranks == ring)
                                for op, key, ranks in rec.calls})
                out[f"{u}x{r}:{name}"] = {
                    "bitwise": bool(torch.equal(own, hooked)), "after": bool(torch.equal(own, after)),
                    "vs_full": float((own - ref).abs().max()), "calls": [list(c) for c in calls],
                    "n_calls": len(rec.calls), "unrouted": hooks.unrouted,
                }
            out[f"{u}x{r}:ef"] = _ef_run(rank, world, hook_yunchang)
    return out


def _ef_run(rank: int, world: int, hook_yunchang: Any, steps: int = 6) -> dict[str, Any]:
    """int2 with error feedback over drifting inputs: rel-L2 against yunchang's exact output per step."""
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    attn = LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_FLASH)
    hook = CompactHook({"compressor": "int2", "residual": "ef", "warmup_steps": 1, "warmup_compressor": None})
    errors = []
    for step in range(steps):
        ql, kl, vl = (_shard(x, rank, world) for x in _inputs(step))
        with torch.no_grad():
            exact = attn(ql, kl, vl)
            with hook_yunchang(hook, attn, "blocks.0.attn"):
                y = attn(ql, kl, vl)
        hook.next_step()
        err = torch.tensor([_rel(y, exact)])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors.append(float(err))
    stats = hook.stats()
    return {"errors": errors, "ratio": stats["compression_ratio"], "keys": sorted(stats["per_key"])}


# -- lifecycle: nesting, reuse across requests, two threads, two instances ----------------------------


class Lockstep(CommHook):
    """Records (thread, key, group) per call and holds each call until the other thread makes its own
    (a threading.Barrier), so two threads' forwards overlap at every collective."""

    def __init__(self, inner: CommHook, parties: int = 2) -> None:
        import threading

        self.inner = inner
        self.barrier = threading.Barrier(parties, timeout=60)
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        import threading

        self.calls.append((threading.current_thread().name, str(call.key), call.group))
        self.barrier.wait()
        return self.inner(call)


def _layer() -> Any:
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    return LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_FLASH)


def _routed_through(owner: Any) -> bool:
    """Whether both of yunchang's comm modules call ``owner``'s hook (else torch.distributed itself)."""
    import yunchang.comm.all_to_all as a2a
    import yunchang.ring.utils as ring_utils

    return all(getattr(getattr(m.dist, "_owner", None), "hook", None) is owner for m in (a2a, ring_utils))


def _restored() -> bool:
    import yunchang.comm.all_to_all as a2a
    import yunchang.ring.utils as ring_utils

    return a2a.dist is dist and ring_utils.dist is dist


def _nesting(rank: int, world: int) -> dict[str, Any]:
    """An inner ``with`` of the same instance, then the outer block's calls, then after both."""
    from compact_hooks.integrations.yunchang import YunchangHooks

    attn = _layer()
    ql, kl, vl = (_shard(x, rank, world) for x in _inputs())
    rec = Recorder(PassthroughHook())
    hooks = YunchangHooks(rec)
    hooks.attach(attn, "blocks.0.attn")
    with torch.no_grad():
        own = attn(ql, kl, vl)
        with hooks:
            with hooks:
                inner = attn(ql, kl, vl)
            n_inner = len(rec.calls)
            routed_after_inner = _routed_through(rec)
            outer = attn(ql, kl, vl)
            n_outer = len(rec.calls) - n_inner
        after = attn(ql, kl, vl)
    return {"keys_inner": [c[1] for c in rec.calls[:n_inner]], "keys_outer": [c[1] for c in rec.calls[n_inner:]],
            "n_outer": n_outer, "n_after": len(rec.calls) - n_inner - n_outer,
            "routed_after_inner": routed_after_inner, "restored": _restored(),
            "bitwise": all(torch.equal(own, y) for y in (inner, outer, after))}


def _reuse(rank: int, world: int, requests: int = 2, steps: int = 3) -> dict[str, Any]:
    """One instance attached once and entered per step over two requests; a key rule sends the
    attention's calls plain (int2 with error feedback otherwise), so a matching key gives yunchang's
    own output bit for bit."""
    from compact_hooks.integrations.yunchang import YunchangHooks

    attn = _layer()
    hook = CompactHook({"compressor": "int2", "residual": "ef", "warmup_steps": 1,
                        "rules": [{"match": {"key": "blocks.*.attn:*"}, "plain": True}]})
    rec = Recorder(hook)
    hooks = YunchangHooks(rec)
    hooks.attach(attn, "blocks.0.attn")
    out: dict[str, Any] = {"keys": [], "bitwise": []}
    for _ in range(requests):
        hook.begin_request()
        keys, same = set(), []
        for step in range(steps):
            ql, kl, vl = (_shard(x, rank, world) for x in _inputs(step))
            start = len(rec.calls)
            with torch.no_grad():
                own = attn(ql, kl, vl)
                with hooks:
                    y = attn(ql, kl, vl)
            hook.next_step()
            keys |= {c[1] for c in rec.calls[start:]}
            same.append(bool(torch.equal(own, y)))
        out["keys"].append(sorted(keys))
        out["bitwise"].append(same)
    return out


def _threads(rank: int, world: int, u: int, r: int, forwards: int = 3) -> dict[str, Any]:
    """Two threads, each with its own attention layer on its own process groups, forward through one
    shared instance at the same time (each collective waits for the other thread's)."""
    import threading

    from compact_hooks.integrations.yunchang import YunchangHooks
    from yunchang import set_seq_parallel_pg

    layers = []
    for _ in range(2):
        set_seq_parallel_pg(u, r, rank, world)  # new groups each time
        layers.append(_layer())
    step = Lockstep(PassthroughHook())
    hooks = YunchangHooks(step)
    for t, attn in enumerate(layers):
        hooks.attach(attn, f"t{t}.attn")
    ql, kl, vl = (_shard(x, rank, world) for x in _inputs())
    with torch.no_grad():
        own = [attn(ql, kl, vl) for attn in layers]
    got: dict[str, Any] = {}

    def run(t: int) -> None:
        try:
            with torch.no_grad(), hooks:
                got[f"t{t}"] = [layers[t](ql, kl, vl) for _ in range(forwards)]
        except Exception as exc:  # reported to the test, which names it
            got[f"t{t}"] = repr(exc)

    threads = [threading.Thread(target=run, args=(t,), name=f"t{t}") for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    groups = [(a.ulysses_pg if u > 1 else a.ring_pg) for a in layers]
    out: dict[str, Any] = {"restored": _restored()}
    for t in range(2):
        mine = [c for c in step.calls if c[0] == f"t{t}"]
        out[f"t{t}"] = {
            "error": got[f"t{t}"] if isinstance(got[f"t{t}"], str) else None,
            "keys": [c[1] for c in mine], "own_group": all(c[2] is groups[t] for c in mine),
            "bitwise": not isinstance(got[f"t{t}"], str) and all(torch.equal(own[t], y) for y in got[f"t{t}"]),
        }
    return out


def _two_instances(rank: int, world: int) -> dict[str, Any]:
    """Two instances keying one module: the second cannot route while the first does (a clear error,
    nothing changed), each routes with its own key in turn, detach() hands the module back."""
    import gc

    from compact_hooks.integrations.yunchang import YunchangHooks, hook_yunchang

    attn = _layer()
    ql, kl, vl = (_shard(x, rank, world) for x in _inputs())
    rec_a, rec_b = Recorder(PassthroughHook()), Recorder(PassthroughHook())
    a, b = YunchangHooks(rec_a), YunchangHooks(rec_b)
    a.attach(attn, "a.attn")
    b.attach(attn, "b.attn")
    ys = []
    error = None
    with torch.no_grad():
        own = attn(ql, kl, vl)
        with a:
            try:
                with b:
                    pass
            except RuntimeError as exc:
                error = str(exc)
            routed_a = _routed_through(rec_a) and not b.routed
            ys.append(attn(ql, kl, vl))
        restored_after_a = _restored()
        with b:
            ys.append(attn(ql, kl, vl))
        a.detach(attn)
        with b:
            ys.append(attn(ql, kl, vl))  # b keeps its key after a let go
        n_b = len(rec_b.calls)
        b.detach(attn)
        own_forward = "forward" not in vars(attn)
        with b:
            ys.append(attn(ql, kl, vl))  # routed, no key
        for _ in range(3):  # the one-shot form per step: dropped instances let go of the module
            with hook_yunchang(rec_b, attn, "blocks.0.attn"):
                ys.append(attn(ql, kl, vl))
        gc.collect()
        live = len(vars(attn)["forward"].keys)
    return {"error": error, "routed_a": routed_a, "restored_after_a": restored_after_a, "restored": _restored(),
            "keys_a": [c[1] for c in rec_a.calls], "keys_b": [c[1] for c in rec_b.calls[:n_b]],
            "keys_b_detached": [c[1] for c in rec_b.calls[n_b:n_b + 4]], "own_forward": own_forward,
            "live_keys": live, "bitwise": all(torch.equal(own, y) for y in ys)}


def yunchang_lifecycle_worker(rank: int, world: int) -> dict[str, Any]:
    """Nesting, reuse over requests and two threads on one YunchangHooks; two instances (2 ranks)."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.yunchang import cpu_flash_attention
    from yunchang import set_seq_parallel_pg

    out: dict[str, Any] = {}
    with cpu_flash_attention():
        set_seq_parallel_pg(2, 1, rank, world)
        out["nesting"] = _nesting(rank, world)
        out["reuse"] = _reuse(rank, world)
        out["threads_2x1"] = _threads(rank, world, 2, 1)
        out["threads_1x2"] = _threads(rank, world, 1, 2)
        set_seq_parallel_pg(2, 1, rank, world)
        out["two_instances"] = _two_instances(rank, world)
    return out


# -- overlap: yunchang's ring keeps computing while the hook's exchange is in flight -----------------


class Gate(CommHook):
    """Rank 1's hook: holds each ring hop's start (after the first) until rank 0 says its ``commit()``
    of that hop returned (the store key ``committed<n>``)."""

    def __init__(self, inner: CommHook, store: Any, patience_s: float) -> None:
        self.inner, self.store, self.patience_s = inner, store, patience_s
        self.hops = 0

    def start(self, call: CollectiveCall) -> Any:
        from datetime import timedelta

        if call.op == "ring_exchange" and ":ring_k." in str(call.key):
            self.hops += 1
        if call.op == "ring_exchange" and ":ring_k." in str(call.key) and self.hops > 1:
            # not the first forward: a CompactHook's first call of a key runs the (blocking) settings
            # and tensor handshakes inside start
            self.store.wait([f"committed{self.hops}"], timedelta(seconds=self.patience_s))
        return self.inner.start(call)

    def next_step(self) -> None:
        self.inner.next_step()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


def yunchang_overlap_worker(rank: int, world: int, codec: str, patience_s: float) -> dict[str, Any]:
    """Ring 1x2, yunchang's basic_pytorch ring through the hook (``codec``: "passthrough" or a
    compressor). Rank 0's ``RingComm.commit()`` (yunchang's ``batch_isend_irecv``) must return while
    rank 1 has not even started its side of the hop: rank 1 starts only once rank 0's commit returned.
    A synchronous exchange inside commit would wait for rank 1 forever (here: ``patience_s``)."""
    torch.set_num_threads(1)
    import yunchang.ring.utils as ring_utils
    from compact_hooks.integrations.yunchang import YunchangHooks, cpu_flash_attention
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    store = dist.distributed_c10d._get_default_store()
    inner = PassthroughHook(60) if codec == "passthrough" else CompactHook(
        {"compressor": codec, "warmup_compressor": None, "timeout_s": 60})
    hook: CommHook = Gate(inner, store, patience_s) if rank == 1 else inner
    commits = {"n": 0}
    original = ring_utils.RingComm.commit

    def commit(self: Any) -> None:
        original(self)
        commits["n"] += 1
        if rank == 0:
            store.set(f"committed{commits['n']}", "1")

    ring_utils.RingComm.commit = commit  # type: ignore[method-assign]
    out: dict[str, Any] = {"errors": []}
    try:
        with cpu_flash_attention():
            set_seq_parallel_pg(1, 2, rank, world)
            attn = LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_FLASH)
            for step in range(3):
                ql, kl, vl = (_shard(x, rank, world) for x in _inputs(step))
                with torch.no_grad():
                    with YunchangHooks(hook) as hooks:
                        hooks.attach(attn, "blocks.0.attn")
                        y = attn(ql, kl, vl)
                    hooks.detach()
                    ring_utils.RingComm.commit = original  # type: ignore[method-assign]
                    own = attn(ql, kl, vl)
                    ring_utils.RingComm.commit = commit  # type: ignore[method-assign]
                hook.next_step()
                out["errors"].append(_rel(y, own))
                if codec == "passthrough":
                    out.setdefault("bitwise", []).append(bool(torch.equal(y, own)))
    finally:
        ring_utils.RingComm.commit = original  # type: ignore[method-assign]
    out["commits"] = commits["n"]
    out["keys"] = sorted(hook.stats().get("per_key", {}))
    return out
