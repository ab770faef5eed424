"""Rank functions of the multi-rank reliability tests (run by :func:`tests.distributed.run_ranks`).

Each returns plain data (summaries per step, digests, stats) that the test asserts on, so one
spawned group serves several tests. Inputs are seeded by rank and step; every rank also runs the
plain collective on the same inputs, the exact reference.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import torch

import compact_hooks as ch
from compact_hooks import wire
from compact_hooks.collectives import protocol

OPS = ("all_gather", "all_to_all", "all_reduce", "ring_exchange")
BAD_RANK = 1


def inputs(rank: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
           seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A fixed tensor per rank plus a slow drift and a little noise (adjacent denoising steps)."""
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + 13)
    x0 = torch.randn(shape, generator=g) * (1 + rank)
    direction = torch.randn(shape, generator=g)
    wobble = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 31 + step * 1009 + rank))
    return ((x0 + 0.05 * step * direction + 0.01 * wobble) * scale).to(dtype)


def call(hook: ch.CommHook, op: str, x: torch.Tensor, key: Optional[str] = None) -> torch.Tensor:
    return hook(ch.CollectiveCall(op, x, None, key=key if key is not None else op))


def parts(op: str, t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """The result cut into the pieces that came from one stream each (ring: one piece)."""
    if op == "ring_exchange":
        return [t]
    if op == "all_reduce":
        return list(t.reshape(-1, t.shape[-1]).chunk(world, dim=0))
    return list(t.chunk(world, dim=0))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want64 = want.double()
    return float((got.double() - want64).norm() / want64.norm().clamp_min(1e-300))


def bases_finite(hook: ch.CompactHook) -> bool:
    for state in hook.session.keys.values():
        for channel in state.channels.values():
            for t in (channel.base, channel.velocity):
                if t is not None and not bool(torch.isfinite(t.float()).all()):
                    return False
    return True


def summarize(op: str, got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, rank: int, world: int) -> dict[str, Any]:
    """Per piece: is it all NaN / all finite, did the exact reference hold a non-finite value, is it
    the local piece and equal to it; plus the relative error over the pieces that should be finite."""
    summary: dict[str, Any] = {"parts": [], "shape_ok": got.shape == want.shape and got.dtype == want.dtype,
                               "nonfinite_match": bool(torch.equal(torch.isfinite(got), torch.isfinite(want)))}
    finite_got, finite_want = [], []
    own = rank if op in ("all_gather", "all_to_all") else None
    x_parts = parts(op, x, world) if op == "all_to_all" else [x] * world
    for j, (g, w) in enumerate(zip(parts(op, got, world), parts(op, want, world))):
        state = "allnan" if bool(torch.isnan(g).all()) else ("finite" if bool(torch.isfinite(g).all()) else "mixed")
        want_bad = not bool(torch.isfinite(w).all())
        exact = bool(torch.equal(torch.nan_to_num(g, nan=0.5), torch.nan_to_num(w, nan=0.5))) and bool(
            torch.equal(torch.isnan(g), torch.isnan(w)))
        local = j == own
        summary["parts"].append({"state": state, "want_nonfinite": want_bad, "local": local, "exact": exact,
                                 "local_exact": local and torch.equal(torch.isnan(g), torch.isnan(x_parts[j]))
                                 and bool(torch.equal(torch.nan_to_num(g), torch.nan_to_num(x_parts[j])))})
        if not want_bad and state == "finite":
            finite_got.append(g.reshape(-1))
            finite_want.append(w.reshape(-1))
    summary["err"] = rel_error(torch.cat(finite_got), torch.cat(finite_want)) if finite_got else None
    return summary


# ---------------------------------------------------------------------------------------------
# Item 2 (NaN/Inf), item 3 (divergence), item 6 (shapes): one spawned group
# ---------------------------------------------------------------------------------------------
NAN_STEPS = 10
NAN_INJECT = {0: float("inf"), 3: float("nan"), 6: float("-inf")}  # step 0 is the warm-up full send


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(x.shape[0], -1)[0, 0] = value
    x.view(x.shape[0], -1)[-1, -1] = value  # the last chunk too (all_to_all / all_reduce pieces)
    return x


def nan_section(rank: int, world: int) -> dict[str, Any]:
    shape = (2 * world, 64)
    out: dict[str, Any] = {}
    for op in OPS:
        for inject in (False, True):
            hook, plain = ch.CompactHook({"compressor": "int2", "residual": "ef", "timeout_s": 30,  # full sends exact
                                          "warmup_compressor": None}), ch.PassthroughHook()
            steps = []
            for step in range(NAN_STEPS):
                x = inputs(rank, step, shape, seed=2)
                if inject and rank == BAD_RANK and step in NAN_INJECT:
                    x = _poison(x, NAN_INJECT[step])
                got, want = call(hook, op, x), call(plain, op, x)
                summary = summarize(op, got, want, x, rank, world)
                summary["bases_finite"] = bases_finite(hook)
                steps.append(summary)
                hook.next_step()
            out[(op, inject)] = {"steps": steps, "digests": hook.session.base_digests(),
                                 "nonfinite": hook.stats()["nonfinite"]}
    return out


DIV_STEPS = 12
DIV_K = 3
DIV_AT = 4  # the base is corrupted before this step's exchange


def _victim_channel(hook: ch.CompactHook, op: str, world: int) -> ch.Channel:
    """On BAD_RANK: the copy of rank 0's stream it receives (a receiver-side base)."""
    keys = hook.session.keys
    if op == "all_gather":
        return keys[op].channels[(0, None)]
    if op == "all_reduce":
        return keys[f"{op}:all_gather"].channels[(0, None)]
    return keys[op].channels[(0, BAD_RANK)]  # all_to_all: 0 -> me; ring: my previous rank is 0


def divergence_section(rank: int, world: int) -> dict[str, Any]:
    shape = (2 * world, 64)
    out: dict[str, Any] = {}
    for op in OPS:
        for verify in (DIV_K, 0):
            hook = ch.CompactHook({"compressor": "int2", "residual": "ef", "verify_every": verify, "timeout_s": 30})
            plain = ch.PassthroughHook()
            errors = []
            for step in range(DIV_STEPS):
                if step == DIV_AT and rank == BAD_RANK:
                    _victim_channel(hook, op, world).corrupt_for_testing(5.0)
                x = inputs(rank, step, shape, seed=3)
                errors.append(rel_error(call(hook, op, x), call(plain, op, x)))
                hook.next_step()
            stats = hook.stats()
            out[(op, verify)] = {"errors": errors, "resyncs": stats["resyncs"], "warnings": stats["warnings"],
                                 "full_sends": stats["per_key"][op]["full_sends"],
                                 "digests": hook.session.base_digests(), "bases_finite": bases_finite(hook)}
    return out


# (request, step, shape) of the shape section: a batch change and a resolution change mid-request,
# a new resolution and a dtype change between requests
def shape_plan(world: int) -> list[tuple[int, int, tuple[int, ...], torch.dtype]]:
    a, batch, res, new = (2 * world, 64), (4 * world, 64), (4 * world, 96), (2 * world, 32)
    plan = [(0, s, a, torch.float32) for s in range(3)]
    plan += [(0, 3, batch, torch.float32), (0, 4, batch, torch.float32), (0, 5, res, torch.float32),
             (0, 6, res, torch.float32)]
    plan += [(1, 0, new, torch.float32), (1, 1, new, torch.float32), (1, 2, new, torch.bfloat16),
             (1, 3, new, torch.bfloat16)]
    return plan


def shapes_section(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op in OPS:
        hook = ch.CompactHook({"compressor": "int2", "timeout_s": 30, "warmup_compressor": None})  # full sends exact
        plain = ch.PassthroughHook()
        rows = []
        request = 0
        for req, step, shape, dtype in shape_plan(world):
            if req != request:
                hook.begin_request()
                request = req
            x = inputs(rank, step, shape, dtype, seed=4 + req)
            got, want = call(hook, op, x), call(plain, op, x)
            rows.append({"shape": shape, "dtype": str(dtype), "err": rel_error(got, want),
                         "same_shape": got.shape == want.shape and got.dtype == want.dtype,
                         "exact": bool(torch.equal(got, want)), "full_sends": hook.stats()["per_key"][op]["full_sends"]})
            hook.next_step()
        # dim 0 not divisible by the group size: a clear ValueError, state untouched, group usable
        error = None
        if op == "all_to_all":
            bad = inputs(rank, 9, (2 * world + 1, 32), seed=5)
            try:
                call(hook, op, bad)
            except ValueError as exc:
                error = str(exc)
            x = inputs(rank, 9, (2 * world, 32), torch.bfloat16, seed=5)
            after = rel_error(call(hook, op, x), call(plain, op, x))
            try:
                call(plain, op, bad)
                plain_error = None
            except ValueError as exc:
                plain_error = str(exc)
            out["indivisible"] = {"error": error, "plain_error": plain_error, "err_after": after,
                                  "digests": hook.session.base_digests()}
        out[op] = {"rows": rows, "digests": hook.session.base_digests()}
    return out


def faults_worker(rank: int, world: int) -> dict[str, Any]:
    """Items 2, 3 and 6 in one process group."""
    torch.set_num_threads(1)
    timings = {}
    results: dict[str, Any] = {}
    for name, fn in [("nan", nan_section), ("divergence", divergence_section), ("shapes", shapes_section)]:
        start = time.perf_counter()
        results[name] = fn(rank, world)
        timings[name] = time.perf_counter() - start
    results["timings"] = timings
    return results


# ---------------------------------------------------------------------------------------------
# Item 5: protocol mismatch
# ---------------------------------------------------------------------------------------------
ODD_RANK = 2  # the rank configured differently
V = wire.WIRE_VERSION  # this release's wire version; the odd rank pretends to run another


def mismatch_cases() -> list[tuple[str, str, dict[str, Any], dict[str, Any], tuple[str, str]]]:
    """(name, op, everyone's block, the odd rank's block, (text of the others' side, of the odd side))."""
    base = {"compressor": "int2", "timeout_s": 20}
    return [
        ("compressor", "all_gather", base, {**base, "compressor": "int4"}, ('"name": "int2"', '"name": "int4"')),
        ("parameter", "all_to_all", {**base, "compressor": {"name": "int2", "group_size": 128}},
         {**base, "compressor": {"name": "int2", "group_size": 64}}, ('"group_size": 128', '"group_size": 64')),
        ("residual", "all_reduce", base, {**base, "residual": "delta"}, ('"residual": "ef"', '"residual": "delta"')),
        ("residual_ef2", "ring_exchange", base, {**base, "residual": "ef2"}, ('"residual": "ef"', '"residual": "ef2"')),
        ("warmup", "all_gather", base, {**base, "warmup_steps": 2}, ('"warmup_steps": 1', '"warmup_steps": 2')),
        ("base_dtype", "all_to_all", base, {**base, "base_dtype": "float32"},
         ('"base_dtype": "input"', '"base_dtype": "torch.float32"')),
        ("verify_every", "all_gather", base, {**base, "verify_every": 2}, ('"verify_every": 0', '"verify_every": 2')),
        ("error_every", "ring_exchange", base, {**base, "stats": {"error_every": 1}}, ('"error_every": 0', '"error_every": 1')),
        ("collectives", "all_gather", base, {**base, "collectives": ["all_to_all"]},
         ('"all_gather"', '"collectives": ["all_to_all"]')),
        ("wire", "all_reduce", base, base, (f'"wire": {V}', f'"wire": {V + 1}')),
    ]


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        fn()
        return {"error": None, "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}


W_HEADER_OPS = ("all_gather", "all_to_all", "ring_exchange", "all_reduce")


def protocol_worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    x = inputs(rank, 0, (2 * world, 64), seed=6)
    out: dict[str, Any] = {}
    for name, op, block, odd, _ in mismatch_cases():
        patched = name == "wire" and rank == ODD_RANK
        if patched:  # a rank running another release of the wire format
            wire.WIRE_VERSION, protocol.WIRE_VERSION = V + 1, V + 1
        try:
            hook = ch.CompactHook(odd if rank == ODD_RANK else block)
            out[name] = _attempt(lambda: call(hook, op, x))
        finally:
            if patched:
                wire.WIRE_VERSION, protocol.WIRE_VERSION = V, V
    # only the header differs (the handshake agrees): verify_headers on the first exchange
    if rank == ODD_RANK:
        wire.WIRE_VERSION = V + 2
    try:
        for op in W_HEADER_OPS:  # every rank must fail, also where only some ranks receive a bad header
            hook = ch.CompactHook({"compressor": "int2", "timeout_s": 20})
            out["header_only" if op == "all_gather" else f"header_only_{op}"] = _attempt(lambda: call(hook, op, x))
    finally:
        wire.WIRE_VERSION = V
    # the errors left the group consistent: matching settings work afterwards
    # (a full first exchange, exact, so the results equal the plain collective's)
    hook, plain = ch.CompactHook({"compressor": "int2", "timeout_s": 20, "warmup_compressor": None}), ch.PassthroughHook()
    out["after"] = {op: bool(torch.equal(call(hook, op, x), call(plain, op, x))) for op in ("all_gather", "all_to_all")}
    return out


# ---------------------------------------------------------------------------------------------
# Item 8: overflow
# ---------------------------------------------------------------------------------------------
OVERFLOW_CODECS: list[Any] = ["int8", "int4", "int2", "int1", "int2cf", {"name": "lowrank", "rank": 2, "factor_bits": 8}]
# (dtype, magnitude of the largest entry, base_dtype)
OVERFLOW_CASES = [("float16", 6.0e4, "input"), ("float16", 6.5e4, "float32"), ("bfloat16", 1.0e5, "input"),
                  ("bfloat16", 1.0e30, "input"), ("bfloat16", 3.0e38, "input"), ("float32", 3.0e38, "float32"),
                  ("bfloat16", 3.0e38, "float32")]
OVERFLOW_STEPS = 6


def _near_range(rank: int, step: int, shape: tuple[int, ...], dtype: torch.dtype, peak: float, op: str,
                world: int) -> torch.Tensor:
    x = inputs(rank, step, shape, seed=8)
    x = x / inputs(rank, 0, shape, seed=8).abs().max()  # the same scale every step: the drift stays visible
    peak = peak / world if op == "all_reduce" else peak  # the exact sum stays in range
    return (x * peak).clamp(-peak, peak).to(dtype)


def overflow_worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    shape = (8 * world, 128)
    out: dict[str, Any] = {}
    for ci, codec in enumerate(OVERFLOW_CODECS):
        for dtype_name, peak, base_dtype in OVERFLOW_CASES:
            dtype = getattr(torch, dtype_name)
            for mode in ("ef", "ef2"):
                hook = ch.CompactHook({"compressor": codec, "residual": mode, "base_dtype": base_dtype, "timeout_s": 30})
                plain = ch.PassthroughHook()
                errors: dict[str, list[float]] = {op: [] for op in OPS}
                stale: dict[str, list[float]] = {op: [] for op in OPS}  # the error of sending nothing new
                first: dict[str, torch.Tensor] = {}
                finite = True
                for step in range(OVERFLOW_STEPS):
                    for op in OPS:
                        x = _near_range(rank, step, shape, dtype, peak, op, world)
                        got, want = call(hook, op, x), call(plain, op, x)
                        finite &= bool(torch.isfinite(got.float()).all()) and got.dtype == x.dtype
                        errors[op].append(rel_error(got, want))
                        first.setdefault(op, want)
                        stale[op].append(rel_error(first[op], want))
                    hook.next_step()
                out[(ci, dtype_name, peak, base_dtype, mode)] = {
                    "errors": errors, "stale": stale, "outputs_finite": finite, "bases_finite": bases_finite(hook),
                    "nonfinite": hook.stats()["nonfinite"], "digests": hook.session.base_digests()}
    # an all_reduce whose exact sum overflows float16: plain gives inf, compact a visible NaN
    hook, plain = ch.CompactHook({"compressor": "int2", "timeout_s": 30}), ch.PassthroughHook()
    rows = []
    for step in range(3):
        x = torch.full((2 * world, 64), 6.0e4, dtype=torch.float16) + step
        got, want = call(hook, "all_reduce", x), call(plain, "all_reduce", x)
        rows.append({"want_inf": bool(torch.isinf(want).all()), "got_nonfinite": not bool(torch.isfinite(got).any()),
                     "bases_finite": bases_finite(hook)})
        hook.next_step()
    out["sum_overflow"] = {"rows": rows, "nonfinite": hook.stats()["nonfinite"]}
    return out


# ---------------------------------------------------------------------------------------------
# Item 7: soak
# ---------------------------------------------------------------------------------------------
SOAK_REQUESTS = 200
SOAK_STEPS = 3
SOAK_FRESH_EVERY = 25  # requests compared against a fresh hook
SOAK_WARM = 10  # RSS and memory are compared from this request on (allocator warm-up)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak_worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    shape = (2 * world, 96)
    config = {"compressor": "int2", "residual": "ef", "timeout_s": 30, "verify_every": 2, "warmup_compressor": None}
    hook = ch.CompactHook(config)
    plain = ch.PassthroughHook()
    memory, rss, mismatched, first_exact = [], [], [], []
    start = time.perf_counter()
    for request in range(SOAK_REQUESTS):
        hook.begin_request()
        fresh = ch.CompactHook(config) if request % SOAK_FRESH_EVERY == SOAK_FRESH_EVERY - 1 else None
        for step in range(SOAK_STEPS):
            for op in OPS:
                x = inputs(rank, step, shape, seed=100 + request)
                got = call(hook, op, x)
                if step == 0 and op != "all_reduce":  # a full send: exact
                    first_exact.append(bool(torch.equal(got, call(plain, op, x))))
                if fresh is not None and not torch.equal(got, call(fresh, op, x)):
                    mismatched.append((request, step, op))
            hook.next_step()
            if fresh is not None:
                fresh.next_step()
        memory.append(hook.session.memory_bytes())
        rss.append(rss_bytes())
    seconds = time.perf_counter() - start
    return {"memory": memory, "rss": rss, "mismatched": mismatched, "first_exact": first_exact,
            "stats": hook.stats(), "seconds": seconds, "digests": hook.session.base_digests()}


def expected_soak_calls() -> int:
    return SOAK_REQUESTS * SOAK_STEPS * len(OPS)



def diffusers_soak_worker(rank: int, world: int, requests: int, steps: int) -> dict[str, Any]:
    """The soak through a tiny FLUX transformer made sequence parallel (Ulysses) by the diffusers
    integration: ``requests`` requests of ``steps`` denoising steps in one process group."""
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import tiny_flux, tiny_inputs

    torch.set_num_threads(1)
    config = {"compressor": "int2", "residual": "ef", "timeout_s": 30}

    def request_inputs(request: int) -> tuple[dict[str, Any], torch.Tensor]:
        kwargs = tiny_inputs("flux", model, batch=1, height=4, width=4, seed=request % 7)
        noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(request))
        return kwargs, noise

    def run_request(handle: Any, request: int) -> list[torch.Tensor]:
        """One denoising loop; the integration starts a request when the timestep goes up."""
        kwargs, noise = request_inputs(request)
        base = kwargs["hidden_states"]
        outs = []
        with torch.no_grad():
            for t in range(steps):
                kwargs["hidden_states"] = base + 0.05 * t * noise
                kwargs["timestep"] = torch.full_like(kwargs["timestep"], 1.0 - t / steps)
                outs.append(handle.model(**kwargs)[0])
        return outs

    model = tiny_flux()
    hook = ch.CompactHook(config)
    handle = parallelize(model, None, "ulysses", hook)
    twin = tiny_flux()  # same seed: the same weights
    memory, rss, mismatched = [], [], []
    start = time.perf_counter()
    for request in range(requests):
        outs = run_request(handle, request)
        if request % SOAK_FRESH_EVERY == SOAK_FRESH_EVERY - 1:
            fresh = parallelize(twin, None, "ulysses", ch.CompactHook(config))
            try:
                if any(not torch.equal(a, b) for a, b in zip(outs, run_request(fresh, request))):
                    mismatched.append(request)
            finally:
                fresh.remove()
        memory.append(hook.session.memory_bytes())
        rss.append(rss_bytes())
    seconds = time.perf_counter() - start
    stats = hook.stats()
    handle.remove()
    return {"memory": memory, "rss": rss, "mismatched": mismatched, "stats": stats, "seconds": seconds,
            "digests": hook.session.base_digests()}
