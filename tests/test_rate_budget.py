"""Issue 24: ``auto`` with a byte budget (``target_ratio`` / ``bytes_of``): the allocator, the codec, and
real gloo runs (bytes within the budget, one exchange per collective, bases equal, host reads)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks.budget import BudgetPlanner, allocate, hull
from compact_hooks.hook import plain_collective
from compact_hooks.registry import build_compressor
from tests.distributed import run_ranks

LEVEL_COSTS = [20, 488, 632, 1176, 2264]  # skip, int1, int2, int4, int8 of a [34, 64] float32 residual


# -- the allocator ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e4, allow_subnormal=False), min_size=1, max_size=12), st.integers(0, 30000))
def test_allocation_stays_within_the_budget_and_is_deterministic(norms, budget):
    costs = [LEVEL_COSTS] * len(norms)
    errors = [[n * c for c in (20.0, 0.47, 0.2, 0.01, 1e-4)] for n in norms]
    levels = allocate(costs, errors, budget)
    spent = sum(c[level] for c, level in zip(costs, levels))
    assert spent <= max(budget, sum(c[0] for c in costs))
    assert levels == allocate(costs, errors, budget)
    # nothing affordable is left undone: no site could move one level up within what is left
    left = budget - spent
    assert all(level == 4 or costs[s][level + 1] - costs[s][level] > left or norms[s] == 0
               for s, level in enumerate(levels))


def test_equal_residuals_at_int2_bytes_all_send_int2():
    costs = [LEVEL_COSTS] * 16
    errors = [[5.0 * c for c in (20.0, 0.47, 0.2, 0.01, 1e-4)]] * 16
    assert allocate(costs, errors, 16 * 632) == [2] * 16


def test_bytes_go_to_the_largest_residuals_first():
    costs = [LEVEL_COSTS] * 3
    errors = [[n * c for c in (20.0, 0.47, 0.2, 0.01, 1e-4)] for n in (1.0, 100.0, 10.0)]
    levels = allocate(costs, errors, 20 + 20 + 1176)
    assert levels == [0, 2, 1]  # 1140 bytes: the largest residual first, then the next; the smallest skips


def test_hull_drops_levels_no_better_per_byte():
    # (bytes, error): the middle point lies above the line from the first to the last
    assert hull([(0, 10.0), (10, 9.0), (20, 0.0)]) == [0, 2]
    assert hull([(0, 10.0), (10, 2.0), (20, 0.0)]) == [0, 1, 2]
    assert hull([(0, 10.0), (10, 10.0), (20, 1.0)]) == [0, 2]


# -- the codec ----------------------------------------------------------------------------------
def test_budget_codec_sizes_norms_and_round_trip():
    codec = build_compressor({"name": "auto", "bytes_of": "int2"})
    assert codec.budgeted and not codec.variable_size
    shape = (34, 64)
    int2 = build_compressor("int2").payload_nbytes(shape, torch.float32)
    assert codec.site_budget(shape, torch.float32) == int2
    assert codec.level_nbytes(2, shape, torch.float32) == int2  # the norms ride in the header: no extra bytes
    assert codec.default_level(shape, torch.float32) == 2
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    errors = []
    for level in range(5):
        payload = codec.encode(x, {"level": level})
        assert payload.numel() == codec.level_nbytes(level, shape, torch.float32)
        decoded = codec.decode(payload, shape, torch.float32)
        r, e = codec.payload_stats(payload).view(torch.bfloat16).float().tolist()
        assert r == pytest.approx(float(x.norm()), rel=1e-2)
        assert e == pytest.approx(float((x - decoded).norm()), rel=1e-2)
        errors.append(e)
    assert errors == sorted(errors, reverse=True) and errors[0] == pytest.approx(float(x.norm()), rel=1e-2)


def test_target_ratio_budget():
    codec = build_compressor({"name": "auto", "target_ratio": 8})
    shape = (34, 64)
    assert codec.site_budget(shape, torch.float32) == 34 * 64 * 4 // 8
    assert codec.level_nbytes(codec.default_level(shape, torch.float32), shape, torch.float32) <= 34 * 64 * 4 // 8
    assert codec.spec() == {"name": "auto", "target_ratio": 8.0, "ladder": ["int1", "int2", "int4", "int8"],
                            "group_size": 128}


def test_threshold_auto_keeps_its_spec():
    assert build_compressor("auto").spec() == {"name": "auto", "target_rel_error": 0.02,
                                               "ladder": ["int1", "int2", "int4", "int8"], "group_size": 128}


@pytest.mark.parametrize("spec, words", [
    ({"name": "auto", "target_ratio": 8, "target_rel_error": 0.1}, "give one of"),
    ({"name": "auto", "target_ratio": 0.5}, "target_ratio must be"),
    ({"name": "auto", "target_ratio": True}, "target_ratio must be"),
    ({"name": "auto", "bytes_of": "auto"}, "fixed-size codec"),
    ({"name": "auto", "bytes_of": "int2", "target_ratio": 4}, "give one of"),
])
def test_bad_budget_specs_are_refused(spec, words):
    with pytest.raises(ch.ConfigError, match=words):
        ch.load_config({"compressor": spec})


@pytest.mark.parametrize("residual", ["none", "delta"])
def test_budget_auto_without_error_feedback_is_refused(residual):
    with pytest.raises(ch.ConfigError, match="needs error feedback"):
        ch.load_config({"compressor": {"name": "auto", "bytes_of": "int2"}, "residual": residual})


@pytest.mark.parametrize("block, where", [
    ({"compressor": {"name": "auto", "bytes_of": "int2"}}, "compact_hooks.compressor"),
    ({"rules": [{"match": {"role": "q"}, "compressor": {"name": "auto", "target_ratio": 8}}]},
     r"compact_hooks.rules\[0\].compressor"),
])
def test_budget_auto_with_the_stale_schedule_is_refused(block, where):
    # the stale schedule decodes a step's payloads in the next step: receivers would allocate without them
    with pytest.raises(ch.ConfigError, match=where):
        ch.load_config({**block, "stale": True})


def test_planner_allocates_from_the_previous_step():
    codec = build_compressor({"name": "auto", "bytes_of": "int2"})
    planner = BudgetPlanner(codec)
    shape = (34, 64)
    x = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) * s for i, s in enumerate((0.01, 1, 1, 30))]
    streams = ["a", "b", "c", "d"]
    for step in range(3):
        ex = [planner.exchange(0, step, s, shape, torch.float32, step == 0, [(0, 1)], []) for s in streams]
        payloads = [codec.encode(xi, {"level": e.send_levels[0]}) for xi, e in zip(x, ex)]
        for e, p in zip(ex, payloads):
            e.sent([p])
    levels = planner.pools[(0, 1)].levels
    spent = sum(codec.level_nbytes(level, shape, torch.float32) for level in levels.values())
    assert spent <= 4 * codec.site_budget(shape, torch.float32)
    assert levels[("d", 0)] > levels[("b", 0)] > levels[("a", 0)], levels
    assert planner.rolls == 2


def planner_levels(spec: dict, steps: int, n_streams: int = 4, requests: int = 1) -> list[list[int]]:
    """The levels a planner gives ``n_streams`` sites of one pool at each step after a full first step
    (``requests`` requests of ``steps`` steps, one after the other)."""
    codec = build_compressor(spec)
    planner = BudgetPlanner(codec)
    shape = (34, 64)
    x = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(n_streams)]
    out = []
    for request in range(requests):
        for step in range(steps):
            ex = [planner.exchange(request, step, f"s{i}", shape, torch.float32, step == 0, [(0, 1)], [])
                  for i in range(n_streams)]
            for xi, e in zip(x, ex):
                e.sent([codec.encode(xi, {"level": e.send_levels[0]}) if step else codec.encode_raw(xi)])
            if step:
                out.append([e.send_levels[0] for e in ex])
    return out


@pytest.mark.parametrize("spec", [{"name": "auto", "bytes_of": "int1"}, {"name": "auto", "target_ratio": 20},
                                  {"name": "auto", "target_ratio": 16}, {"name": "auto", "target_ratio": 60}])
def test_below_int2_bytes_a_pool_sends_whole_steps(spec):
    """Below every site at int2, a step sends every site at int2 or skips every site, the sent steps
    spread evenly; over the steps the pool spends its budget to within half a sent step, and no prefix
    of the steps spends more than that above it."""
    codec = build_compressor(spec)
    shape, n = (34, 64), 4
    int2 = 1 + codec.ladder.index("int2")
    per_level = [codec.level_nbytes(level, shape, torch.float32) for level in range(len(codec.ladder) + 1)]
    budget = n * codec.site_budget(shape, torch.float32)
    assert budget < n * per_level[int2]
    steps = planner_levels(spec, 40, n)
    assert steps == planner_levels(spec, 40, n)  # deterministic
    assert all(levels in ([int2] * n, [0] * n) for levels in steps), steps
    half_step = n * (per_level[int2] - per_level[0]) / 2
    spent = 0
    for t, levels in enumerate(steps, start=1):
        spent += sum(per_level[level] for level in levels)
        assert spent <= t * budget + half_step, (t, spent, t * budget)
    assert abs(spent - len(steps) * budget) <= half_step
    share = (budget - n * per_level[0]) / (n * (per_level[int2] - per_level[0]))
    sent = [sum(levels[0] == int2 for levels in steps[:k]) for k in range(len(steps) + 1)]
    assert sent == [math.floor(k * share + 0.5) for k in range(len(steps) + 1)], (share, sent)  # evenly spread


@pytest.mark.parametrize("spec", [{"name": "auto", "bytes_of": "int1"}, {"name": "auto", "target_ratio": 40}])
@pytest.mark.parametrize("steps", [8, 20])
def test_whole_steps_send_the_last_step_of_a_request_as_long_as_the_last(spec, steps):
    """From the second request on, the sent steps are counted back from the expected end: the last step
    is always sent, and a request spends its budget to within one sent step."""
    codec = build_compressor(spec)
    shape, n = (34, 64), 4
    int2 = 1 + codec.ladder.index("int2")
    per_level = [codec.level_nbytes(level, shape, torch.float32) for level in range(len(codec.ladder) + 1)]
    budget = n * codec.site_budget(shape, torch.float32)
    runs = planner_levels(spec, steps, n, requests=3)
    first, later = runs[:steps - 1], [runs[r * (steps - 1):(r + 1) * (steps - 1)] for r in (1, 2)]
    share = (budget - n * per_level[0]) / (n * (per_level[int2] - per_level[0]))
    sent = [sum(levels[0] == int2 for levels in first[:k]) for k in range(len(first) + 1)]
    assert sent == [math.floor(k * share + 0.5) for k in range(len(first) + 1)]  # first request: from its start
    for run in later:
        assert all(levels in ([int2] * n, [0] * n) for levels in run), run
        assert run[-1] == [int2] * n, run  # the last step is sent
        spent = sum(per_level[level] for levels in run for level in levels)
        assert abs(spent - len(run) * budget) <= n * (per_level[int2] - per_level[0]), (spent, len(run) * budget)
    assert later[0] == later[1]


@pytest.mark.parametrize("fixed, early_level, early_steps, last_level", [
    ("int2", 0, 1, "int4"),  # int2 steps down to skip (not int1): one skipped step pays for int4 at the end
    ("int4", "int2", 2, "int8"),
])
def test_from_the_second_request_the_last_step_gets_bytes_from_the_first(fixed, early_level, early_steps, last_level):
    """At a fixed codec's bytes: a hook's first request sends that level throughout; later requests (as
    long as the first) send the last step one level finer, paid for by the first steps one level coarser,
    within the request's budget."""
    spec = {"name": "auto", "bytes_of": fixed}
    codec = build_compressor(spec)
    shape, n, steps = (34, 64), 4, 8
    level = {name: 1 + codec.ladder.index(name) for name in codec.ladder}
    early = early_level if isinstance(early_level, int) else level[early_level]
    per_level = [codec.level_nbytes(lv, shape, torch.float32) for lv in range(len(codec.ladder) + 1)]
    runs = planner_levels(spec, steps, n, requests=3)
    first, later = runs[:steps - 1], [runs[r * (steps - 1):(r + 1) * (steps - 1)] for r in (1, 2)]
    assert first == [[level[fixed]] * n] * (steps - 1)
    for run in later:
        want = [[early] * n] * early_steps + [[level[fixed]] * n] * (steps - 2 - early_steps) + [[level[last_level]] * n]
        assert run == want, run
        spent = sum(per_level[lv] for levels in run for lv in levels)
        assert spent <= (steps - 1) * n * codec.site_budget(shape, torch.float32)


def test_at_int2_bytes_and_above_the_per_site_allocation_is_kept():
    for spec in ({"name": "auto", "bytes_of": "int2"}, {"name": "auto", "bytes_of": "int4"}):
        assert all(0 not in levels for levels in planner_levels(spec, 6)), spec  # one request: no shift
    # a ladder without int2 has no whole-step mode: the per-site allocation, int1 here
    assert all(set(levels) == {1} for levels in planner_levels({"name": "auto", "bytes_of": "int1",
                                                                "ladder": ["int1", "int4", "int8"]}, 6))


# -- real ranks ---------------------------------------------------------------------------------
OPS = {"all_to_all": lambda world: (4 * world, 64), "all_gather": lambda world: (4, 64),
       "ring_exchange": lambda world: (4, 64), "all_reduce": lambda world: (8 * world, 64)}
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__")
CPU_ONLY = {"clean", "poison_if", "_clean", "_poison_if"}  # read a flag only for CPU tensors (free there)


def count_reads(run) -> list[str]:
    """Host reads of tensors while ``run()`` runs (a read on a GPU is a device sync)."""
    reads: list[str] = []
    saved = [(n, getattr(torch.Tensor, n)) for n in HOST_READS]

    def counted(fn, name):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller not in CPU_ONLY:
                reads.append(f"{name} in {caller}")
            return fn(*args, **kwargs)
        return wrapped
    try:
        for name, fn in saved:
            setattr(torch.Tensor, name, counted(fn, name))
        run()
    finally:
        for name, fn in saved:
            setattr(torch.Tensor, name, fn)
    return reads


def activation(op: str, world: int, rank: int, step: int, scale: float, rows: int = 1) -> torch.Tensor:
    shape = (rows * OPS[op](world)[0], OPS[op](world)[1])
    base = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
    return base + scale * step * torch.randn(shape, generator=torch.Generator().manual_seed(100 * rank + step))


def budget_worker(rank: int, world: int, steps: int, spec: dict, rows: int = 1) -> dict:
    import torch.distributed as dist

    calls: list[str] = []
    for name in ("all_to_all_single", "all_gather_into_tensor", "all_gather_single", "batch_isend_irecv",
                 "all_gather"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        setattr(dist, name, (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(fn, name))
    hook = ch.CompactHook({"compressor": spec, "timeout_s": 60, "warmup_compressor": None})
    reads: dict[str, list[list[str]]] = {op: [] for op in OPS}
    exchanges: dict[str, list[int]] = {op: [] for op in OPS}
    errors: dict[str, list[float]] = {op: [] for op in OPS}
    for step in range(steps):
        for op in OPS:
            for site in range(2):  # two call sites per op: residuals of very different sizes
                x = activation(op, world, rank, step, 0.02 * (1 + 30 * site), rows)
                call = ch.CollectiveCall(op, x, None, key=f"{op}:{site}")
                before = len(calls)
                got: list[torch.Tensor] = []
                r = count_reads(lambda: got.append(hook(call)))
                if step >= 2:
                    reads[op].append(r)
                    exchanges[op].append(len(calls) - before)
                want = plain_collective(call)
                errors[op].append(float((got[0] - want).norm() / want.norm()))
        hook.next_step()
    session = hook.sessions()[0]
    per_step = [row["wire_bytes"] for row in hook.stats()["per_step"]]
    levels = session.budget.describe() if session.budget is not None else None
    return {"reads": reads, "exchanges": exchanges, "errors": errors, "per_step": per_step,
            "digests": session.base_digests(), "levels": levels}


def test_budget_auto_on_real_ranks():
    """4 gloo ranks, every op, two call sites each: one exchange per collective (no length exchange),
    at most one host read per collective call, each steady step within 5% of int2's bytes and not
    above them, bases equal on every rank, and the larger residual gets the finer levels."""
    world, steps = 4, 6
    results = run_ranks(budget_worker, world, steps, {"name": "auto", "bytes_of": "int2"})
    fixed = run_ranks(budget_worker, world, steps, "int2")
    for rank, (res, ref) in enumerate(zip(results, fixed)):
        for op in OPS:
            want = 2 if op == "all_reduce" else 1  # all_reduce: its two stages
            assert all(n == want for n in res["exchanges"][op]), (rank, op, res["exchanges"][op])
            assert all(len(r) <= 1 for r in res["reads"][op]), (rank, op, res["reads"][op])
            assert max(res["errors"][op]) < 0.6, (rank, op, res["errors"][op])
        # reads: one per step at most (the first budgeted call of a step reads the last step's norms)
        assert sum(len(r) for op in OPS for r in res["reads"][op]) <= steps - 2, res["reads"]
        for step in range(1, steps):
            auto, int2 = res["per_step"][step], ref["per_step"][step]
            assert 0.95 * int2 <= auto <= int2, (rank, step, auto, int2)
        pools = res["levels"]
        coarse = [lv for pool in pools.values() for (key, _), lv in pool.items() if key.endswith(":0")]
        fine = [lv for pool in pools.values() for (key, _), lv in pool.items() if key.endswith(":1")]
        assert coarse and fine and max(coarse) < min(fine), pools
    for name in set().union(*(r["digests"] for r in results)):
        held = {r["digests"][name] for r in results if name in r["digests"]}
        assert len(held) == 1, name


def test_budget_auto_below_int2_bytes_on_real_ranks():
    """4 gloo ranks at int1's budget (whole steps): still one exchange per collective, at most one host
    read per call, bases equal on every rank; over the steps about int1's bytes, some steps skipped."""
    world, steps, rows = 4, 6, 16  # 16x the rows: int1's scales no longer outweigh its codes
    results = run_ranks(budget_worker, world, steps, {"name": "auto", "bytes_of": "int1"}, rows)
    int1 = run_ranks(budget_worker, world, steps, "int1", rows)
    int2 = run_ranks(budget_worker, world, steps, "int2", rows)
    for rank, res in enumerate(results):
        for op in OPS:
            want = 2 if op == "all_reduce" else 1
            assert all(n == want for n in res["exchanges"][op]), (rank, op, res["exchanges"][op])
            assert all(len(r) <= 1 for r in res["reads"][op]), (rank, op, res["reads"][op])
        spent, budget = sum(res["per_step"][1:]), sum(int1[rank]["per_step"][1:])
        assert 0.75 * budget <= spent <= 1.1 * budget, (rank, spent, budget)
        assert min(res["per_step"][1:]) < 0.5 * min(int2[rank]["per_step"][1:]), res["per_step"]  # a skipped step
    for name in set().union(*(r["digests"] for r in results)):
        assert len({r["digests"][name] for r in results if name in r["digests"]}) == 1, name
