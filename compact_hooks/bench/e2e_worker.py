"""Rank program of ``compact-hooks bench e2e``; :mod:`compact_hooks.bench.e2e` starts it with
mpirun on emulated hosts (one rank per host)::

    python -m compact_hooks.bench.e2e_worker --model medium --steps 4 --rate 20mbit --result r.json

Every rank builds the same random-weight FLUX pipeline and runs every method on the same inputs and
seed in one process group (1 torch thread per rank). Each run starts after a barrier; its latency is
the slowest rank's time until the pipeline returned (pending asynchronous exchanges, e.g. the stale
hook's last one, are drained afterwards, outside the timed region). Rank 0 writes the raw
measurements as JSON to ``--result``; the driver derives ratios, ideals and tables from them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import compact_hooks as ch
from compact_hooks.bench.e2e import (
    COMPACT_METHODS,
    DEFAULT_AUTO_TARGET,
    LADDER_CODECS,
    LADDER_MODES,
    MODELS,
    PROGRESS,
    lowrank_spec,
)
from compact_hooks.collectives import group_size
from compact_hooks.collectives.relay import Relay
from compact_hooks.hook import CollectiveCall, CommHook, WrappingHook, plain_collective
from compact_hooks.work import CollectiveWork, Watch

Group = Optional[dist.ProcessGroup]


# ---- hooks --------------------------------------------------------------------------------------


def ring_bytes(call: CollectiveCall, world: int) -> int:
    """Bytes this rank sends for ``call`` uncompressed (ring / pairwise convention)."""
    n = call.tensor.numel() * call.tensor.element_size()
    return {"all_gather": (world - 1) * n, "all_to_all": (world - 1) * n // world,
            "all_reduce": 2 * (world - 1) * n // world, "ring_exchange": n}[call.op]


class NoopHook(CommHook):
    """``compute_only``: a result of the right shape without communicating (like DDP's noop hook)."""

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        if call.op == "all_gather":
            return torch.cat([call.tensor] * group_size(call.group), dim=call.dim)
        return call.tensor


class RawHook(CommHook):
    """The least a hook can do: ``dist.all_to_all_single`` straight away (the overhead baseline)."""

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        if call.op != "all_to_all":
            return plain_collective(call)
        out = torch.empty_like(call.tensor)
        dist.all_to_all_single(out, call.tensor, group=call.group)
        return out


class Timer:
    """Seconds and calls accumulated by the functions it wraps."""

    seconds: float = 0.0
    calls: int = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


class MeteredHook(WrappingHook):
    """Wraps a hook: time spent in it (in ``start`` and blocked in ``wait``), calls, and the uncompressed
    bytes of what it was asked to move. Asynchronous like the hook it wraps (relays included)."""

    def __init__(self, inner: CommHook, world: int) -> None:
        super().__init__(inner)
        self.world = world
        self.timer = Timer()  # seconds in start and wait together; calls = started calls and relays
        self.wait_s = 0.0  # of which blocked in wait() (exposed communication and decode)
        self.raw_bytes = 0

    def __call__(self, call: CollectiveCall, async_op: bool = False) -> Any:
        work = self.start(call)
        return work if async_op else work.wait()

    def _timed_wait(self, work: CollectiveWork) -> CollectiveWork:
        def finish() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return work.wait()
            finally:
                spent = time.perf_counter() - t0
                self.timer.seconds += spent
                self.wait_s += spent
        return CollectiveWork([Watch(work)], finish, work.devices[0] if work.devices else None)

    def start(self, call: CollectiveCall) -> CollectiveWork:
        self.raw_bytes += ring_bytes(call, self.world)
        return self._timed_wait(self.timer.wrap(self.inner.start)(call))

    def start_relay(self, call: CollectiveCall) -> Relay:
        self.raw_bytes += (group_size(call.group) - 1) * ring_bytes(call, self.world)
        return self.timer.wrap(self.inner.start_relay)(call).map(lambda hop, work: self._timed_wait(work))


def compact_of(hook: CommHook) -> Optional[ch.CompactHook]:
    """The CompactHook inside ``hook`` (itself or the one it wraps), if any."""
    inner = getattr(hook, "inner", hook)
    return inner if isinstance(inner, ch.CompactHook) else None


@dataclass
class CodecTimers:
    """Encode and decode time of one CompactHook's compressor (wrapped on that instance only)."""

    encode: Timer = field(default_factory=Timer)
    decode: Timer = field(default_factory=Timer)

    @classmethod
    def install(cls, hook: ch.CompactHook) -> "CodecTimers":
        timers = cls()
        codec = hook.session.compressor
        codec.encode = timers.encode.wrap(codec.encode)  # type: ignore[method-assign]
        codec.decode = timers.decode.wrap(codec.decode)  # type: ignore[method-assign]
        return timers


# ---- runs ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed pipeline call."""

    latents: list[torch.Tensor]  # the latent after each step
    latency_s: float  # the slowest rank's time
    step_end_s: list[float]  # rank 0: seconds from the start to the end of each step


@dataclass
class Bench:
    """The model, its inputs and the process group every method runs on."""

    pipe: Any
    prompt: dict[str, torch.Tensor]
    size: int
    steps: int
    seed: int
    group: Group
    rank: int
    world: int

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def generate(self, steps: Optional[int] = None, run_here: bool = True) -> Run:
        """Run the pipeline (``output_type="latent"``) on every rank, or on this rank only if the others
        pass ``run_here=False``; timed between a barrier and the return."""
        latents: list[torch.Tensor] = []
        ends: list[float] = []

        def on_step_end(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            ends.append(time.perf_counter() - start)
            latents.append(kw["latents"].detach().float().clone())
            return kw

        dist.barrier(group=self.group)
        start = time.perf_counter()
        if run_here:
            with torch.no_grad():
                self.pipe(**self.prompt, num_inference_steps=steps or self.steps, height=self.size, width=self.size,
                          output_type="latent", generator=torch.Generator().manual_seed(self.seed),
                          callback_on_step_end=on_step_end)
        elapsed = time.perf_counter() - start
        return Run(latents, self.max_over_ranks(elapsed), ends)

    def parallel_run(self, hook: CommHook, mode: str = "ulysses", steps: Optional[int] = None
                     ) -> tuple[Run, MeteredHook, dict[str, Any]]:
        """A timed run of the sequence-parallel pipeline with ``hook``; ``(run, meter, hook stats)``."""
        from compact_hooks.integrations.diffusers import parallelize

        metered = MeteredHook(hook, self.world)
        with parallelize(self.pipe, self.group, mode=mode, hook=metered, check_inputs=False):
            run = self.generate(steps)
        stats = hook.stats()
        hook.reset()  # drains pending asynchronous exchanges (stale), outside the timed region
        dist.barrier(group=self.group)
        return run, metered, stats

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, values, group=self.group)
        return {k: sum(float(v[k]) for v in every) / self.world for k in values}


def progress(bench: Bench, text: str) -> None:
    if bench.rank == 0:
        print(f"{PROGRESS}{text}", file=sys.stderr, flush=True)


def wire_per_step(stats: dict[str, Any]) -> tuple[Optional[float], Optional[float]]:
    """``(wire bytes of step 0, mean wire bytes of the later steps)`` from a CompactHook's stats."""
    steps = stats.get("per_step") or []
    first = [s["wire_bytes"] for s in steps if s.get("step") == 0]
    later = [s["wire_bytes"] for s in steps if s.get("step", 0) > 0]
    return (float(first[0]) if first else None), (sum(later) / len(later) if later else None)


def measure(bench: Bench, name: str, hook: CommHook, mode: str, steps: Optional[int] = None
            ) -> tuple[dict[str, Any], Run]:
    """Run one parallel method; its measurements (bytes averaged over ranks, times of rank 0)."""
    steps = steps or bench.steps
    progress(bench, f"{name} ...")
    inner = compact_of(hook)
    codec = CodecTimers.install(inner) if inner is not None else None
    run, metered, stats = bench.parallel_run(hook, mode, steps)
    if inner is not None:
        wire = float(stats["wire_bytes"])
        first, later = wire_per_step(stats)
    elif isinstance(hook, NoopHook):
        wire, first, later = 0.0, 0.0, 0.0
    else:
        wire = float(metered.raw_bytes)
        first = later = wire / steps
    per_rank = bench.mean_over_ranks({"wire": wire, "raw": float(metered.raw_bytes),
                                      "first": first if first is not None else math.nan,
                                      "later": later if later is not None else math.nan})
    result = {
        "name": name, "mode": mode, "hook": type(hook).__name__, "latency_s": run.latency_s,
        "step_end_s": run.step_end_s, "wire_bytes": per_rank["wire"], "raw_bytes": per_rank["raw"],
        "wire_bytes_first_step": _finite(per_rank["first"]), "wire_bytes_later_step": _finite(per_rank["later"]),
        "hook_calls": metered.timer.calls, "hook_s": metered.timer.seconds, "wait_s": metered.wait_s,
        "encode_s": codec.encode.seconds if codec else 0.0, "decode_s": codec.decode.seconds if codec else 0.0,
        "encode_calls": codec.encode.calls if codec else 0, "decode_calls": codec.decode.calls if codec else 0,
    }
    progress(bench, f"{name}: {run.latency_s:.2f} s, {per_rank['wire'] / steps / 1e6:.2f} MB/step/rank")
    return result, run


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def compact(spec: Any, residual: str = "ef") -> CommHook:
    """A CompactHook with ``spec`` and ``residual``."""
    return ch.CompactHook({"compressor": spec, "residual": residual})


def method_block(block: dict[str, Any], lowrank: dict[str, Any], auto_target: float) -> dict[str, Any]:
    """A COMPACT_METHODS block with the bench's lowrank and auto specs filled in."""
    specs = {"lowrank": lowrank, "auto": {"name": "auto", "target_rel_error": auto_target}}
    codec = block["compressor"]
    return {**block, "compressor": specs.get(codec, codec) if isinstance(codec, str) else codec}


# ---- quality ------------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - ref).double()) / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30))


def psnr_db(x: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """PSNR with the reference's dynamic range (max - min) as the peak; ``None`` when identical."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return None if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def quality(run: Run, ref: Run) -> dict[str, Any]:
    """Final-latent PSNR / rel-L2 and the rel-L2 after every step, against ``ref``."""
    return {"psnr_db": psnr_db(run.latents[-1], ref.latents[-1]), "rel_l2": rel_l2(run.latents[-1], ref.latents[-1]),
            "per_step_rel_l2": [rel_l2(a, b) for a, b in zip(run.latents, ref.latents)]}


def add_quality(bench: Bench, rows: list[dict[str, Any]], runs: dict[str, Run], ref: str) -> None:
    """Every row but ``compute_only`` gets its quality against ``runs[ref]`` on rank 0 (None elsewhere)."""
    for row in rows:
        if bench.rank == 0 and row["name"] != "compute_only":
            row.update(quality(runs[row["name"]], runs[ref]))
        else:
            row.update({"psnr_db": None, "rel_l2": None, "per_step_rel_l2": None})


def keep_median_compute(rows: list[dict[str, Any]], runs: dict[str, Run],
                        repeats: list[tuple[dict[str, Any], Run]]) -> None:
    """The median of the ``compute_only`` repeats becomes the first row (every latency, sorted, in
    ``latency_runs_s``) and ``runs["compute_only"]``."""
    repeats = sorted(repeats, key=lambda rr: rr[0]["latency_s"])
    row, runs["compute_only"] = repeats[len(repeats) // 2]
    row["latency_runs_s"] = [r["latency_s"] for r, _ in repeats]
    rows.insert(0, row)


# ---- the sections -------------------------------------------------------------------------------


def methods(bench: Bench, lowrank: dict[str, Any], single: bool,
            auto_target: float = DEFAULT_AUTO_TARGET) -> tuple[list[dict[str, Any]], dict[str, Run]]:
    """Every method of one rate, in one process group; quality against the uncompressed Ulysses run.

    ``compute_only`` runs three times (first, after the uncompressed methods, last); its row is the
    median run, with every latency in ``latency_runs_s`` (the cores are shared: compute time drifts).
    """
    bench.parallel_run(NoopHook(), "ulysses", steps=1)  # first-call costs outside any timing
    compute = ("compute_only", NoopHook, "ulysses")
    plan: list[tuple[str, Callable[[], CommHook], str]] = [
        compute,
        ("ulysses", lambda: compact("none"), "ulysses"),
        ("allgather", lambda: compact("none"), "allgather"),
        ("stale", lambda: ch.StaleHook(1), "allgather"),
        compute,
    ]
    for name, block in COMPACT_METHODS.items():
        plan.append((name, (lambda b=method_block(block, lowrank, auto_target): ch.CompactHook(b)), "ulysses"))
    plan.append(compute)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Run] = {}
    repeats: list[tuple[dict[str, Any], Run]] = []
    for name, make, mode in plan:
        row, run = measure(bench, name, make(), mode)
        if name == "compute_only":
            repeats.append((row, run))
            continue
        rows.append(row)
        runs[name] = run
    keep_median_compute(rows, runs, repeats)
    if single:
        progress(bench, "single ...")
        run = bench.generate(run_here=bench.rank == 0)
        rows.append({"name": "single", "mode": "none", "hook": None, "latency_s": run.latency_s,
                     "step_end_s": run.step_end_s, "wire_bytes": 0.0, "raw_bytes": 0.0, "wire_bytes_first_step": 0.0,
                     "wire_bytes_later_step": 0.0, "hook_calls": 0, "hook_s": 0.0, "encode_s": 0.0, "decode_s": 0.0,
                     "encode_calls": 0, "decode_calls": 0})
        runs["single"] = run
        progress(bench, f"single: {run.latency_s:.2f} s")
    add_quality(bench, rows, runs, "ulysses")
    return rows, runs


def ladder(bench: Bench, lowrank: dict[str, Any], runs: dict[str, Run], steps: int) -> list[dict[str, Any]]:
    """Per codec and residual mode: quality against the uncompressed Ulysses run. At the methods' step
    count ``ef`` reuses their runs; at another one every run (the reference included) is its own."""
    entries = []
    reuse = steps == bench.steps
    ref = runs["ulysses"] if reuse else measure(bench, "ladder reference (ulysses)", compact("none"), "ulysses", steps)[1]
    for codec, method in LADDER_CODECS.items():
        spec = lowrank if codec == "lowrank" else codec
        for residual in LADDER_MODES:
            if residual == "ef" and reuse:
                run, row = runs[method], None
            else:
                row, run = measure(bench, f"{codec}/{residual}", compact(spec, residual), "ulysses", steps)
            entry: dict[str, Any] = {"codec": codec, "compressor": spec, "residual": residual}
            if row is not None:
                entry.update(latency_s=row["latency_s"], wire_bytes=row["wire_bytes"])
            if bench.rank == 0:
                entry.update(quality(run, ref))
            entries.append(entry)
    return entries


def dispatch_cost(bench: Bench, calls: int) -> dict[str, float]:
    """Per-call cost of ``PassthroughHook(CollectiveCall(...))`` over a bare ``all_to_all_single`` on a
    tiny tensor, interleaved so the (equal) network time cancels; medians of ``calls`` each."""
    x = torch.zeros(bench.world, 1)
    hook = ch.PassthroughHook()
    hooked, raw = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        hook(CollectiveCall("all_to_all", x, bench.group, key="overhead:probe"))
        t1 = time.perf_counter()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=bench.group)
        t2 = time.perf_counter()
        hooked.append(t1 - t0)
        raw.append(t2 - t1)
    return {"hooked_call_us": statistics.median(hooked) * 1e6, "raw_call_us": statistics.median(raw) * 1e6}


def overhead(bench: Bench, repeats: int) -> dict[str, Any]:
    """PassthroughHook against a hook that calls ``dist.all_to_all_single`` directly, end to end
    (alternated ``repeats`` times), plus the per-call dispatch cost."""
    times: dict[str, list[float]] = {"passthrough": [], "raw": []}
    calls = 0
    for i in range(repeats):
        for name, make in (("passthrough", ch.PassthroughHook), ("raw", RawHook)):
            row, _ = measure(bench, f"overhead {name} #{i + 1}", make(), "ulysses")
            times[name].append(row["latency_s"])
            calls = row["hook_calls"]
    probe = dispatch_cost(bench, 400)
    return {"latency_s": times, "hook_calls_per_image": calls, **probe}


# ---- main ---------------------------------------------------------------------------------------


def build(model: str, seed: int) -> tuple[Any, dict[str, torch.Tensor], int]:
    from compact_hooks.integrations.diffusers.tiny import default_flux_pipeline, default_prompt_embeds

    spec = dict(MODELS[model])
    size, text = spec.pop("size"), spec.pop("text_tokens")
    pipe = default_flux_pipeline(seed=seed, **spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe, default_prompt_embeds(pipe, seed=seed, text_tokens=text), size


def worker_parser(module: str, rate_help: str = "label of the link rate (the driver set the cap)"
                  ) -> argparse.ArgumentParser:
    """The options every ``bench e2e`` rank program takes (its own are added to the parser returned)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rate", required=True, help=rate_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", required=True, help="rank 0 writes the JSON measurements here")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p


def run_worker(args: argparse.Namespace, body: Callable[[Bench], dict[str, Any]]) -> int:
    """A rank program's frame: one torch thread, the process group, the model; rank 0 writes
    ``{"rate", "world", "steps", **body(bench), "threads_per_rank"}`` to ``--result``."""
    torch.set_num_threads(1)
    from compact_hooks.launcher.mpi import init_distributed

    group = init_distributed(timeout_s=args.timeout)
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        pipe, prompt, size = build(args.model, args.seed)
        bench = Bench(pipe, prompt, size, args.steps, args.seed, group, rank, world)
        result = {"rate": args.rate, "world": world, "steps": args.steps, **body(bench),
                  "threads_per_rank": torch.get_num_threads()}
        if rank == 0:
            with open(args.result, "w") as f:
                json.dump(result, f)
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = worker_parser("compact_hooks.bench.e2e_worker")
    p.add_argument("--lowrank", type=json.loads, default=None, help="lowrank compressor spec (JSON)")
    p.add_argument("--auto-target", type=float, default=DEFAULT_AUTO_TARGET, help="target_rel_error of compact_auto")
    p.add_argument("--single", action="store_true", help="also time the unparallelized model on rank 0")
    p.add_argument("--ladder", action="store_true", help="also run the quality ladder")
    p.add_argument("--ladder-steps", type=int, default=0, help="steps of the ladder's runs (default: --steps)")
    p.add_argument("--overhead", type=int, default=0, help="repeats of the overhead A/B (0: skip)")
    args = p.parse_args(argv)

    def body(bench: Bench) -> dict[str, Any]:
        lowrank = args.lowrank or lowrank_spec()
        progress(bench, f"rate {args.rate}: {bench.world} ranks, model {args.model}, {args.steps} steps")
        rows, runs = methods(bench, lowrank, args.single, args.auto_target)
        result: dict[str, Any] = {"methods": rows}
        if args.ladder:
            result["quality_ladder"] = ladder(bench, lowrank, runs, args.ladder_steps or args.steps)
        if args.overhead:
            result["overhead"] = overhead(bench, args.overhead)
        return result

    return run_worker(args, body)


if __name__ == "__main__":
    sys.exit(main())
