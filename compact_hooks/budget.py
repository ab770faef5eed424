"""The byte budget of ``auto`` (``target_ratio`` / ``bytes_of``): which level each call site sends in a step.

A *pool* is one directed link, ``(source rank, destination rank)`` (``None``: every rank, the streams of
an all-gather). Its *sites* are the calls of a step on that link: ``(stream name, occurrence in the
step)``. Every pool spends per step at most the sum of its sites' budgets, allocated at the step's
first call from what the previous step measured (the call order of a step repeats):

* every residual payload carries the residual's norm ``r`` and the error its level left ``e`` (two
  bfloat16 in header bytes 12..15, in place of the element count, which receivers know), so sender
  and receivers of a pool hold the same numbers;
* a site's next residual is predicted as ``n^2 = max(r^2 - e_prev^2, 0) + e^2`` (this step's change,
  ``r`` without last step's leftover, plus what is left now);
* a level of relative squared error ``c^2`` costs ``n^2 c^2 / (1 - c^2)``: error feedback sends what
  a level leaves again in the next steps (a skip counts as ``c^2 = 0.95``); ``c`` starts at typical
  values and follows the pool's measured ``e / r`` per level, so nothing is tuned to one model;
* greedy on the lower convex hull of each site's (bytes, cost) points: the largest reduction per
  byte first, while the pool's budget lasts; then any finer level that still fits.

Below the bytes of every site at ``int2`` (:data:`WHOLE_STEP_LEVEL`) a pool sends *whole steps*
instead: every site at int2 on a share ``f`` of the steps (what the budget affords above the skips'
headers), every site skipped on the others (error feedback carries a skipped residual into the next
sent step). The sent steps are spread evenly, counted back from the end of the run when its length is
known - runs (requests) are expected to be as long as the last one - so that the last step, whose error
no later step corrects, is always sent; in a run of unknown length from its start (of the first ``k``
steps, ``round(k f)`` are sent). Either way the pool spends its budget to within one sent step. On
the trained models this beats int1 at int1's bytes by several dB (docs/quality.md).

From a hook's second request on (a request expected as long as the last one), the last step of a
request is sent one level finer at every site, paid for by its first compressed steps one level coarser
(skip rather than int1): the last step's error reaches the output with no later step to correct it,
while the first steps' residuals are the smallest of the run and error feedback carries what they
leave. Measured on two trained models this is +2.4 to +4.9 dB at int2's and int4's bytes.

Sender and receivers run the same code on the same bytes, so every rank knows every payload's size
before the exchange: no length exchange, one host read per step (all norms of the step at once).
A site with no measurement yet takes part with the pool's mean residual (after a full send) or sends
the finest level within its own budget (a site new in this step). Deterministic: the same tensors give
the same levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

Pool = tuple[int, Optional[int]]
Site = tuple[str, int]
EMA = 0.5  # weight of a step's measured level error against the running value
HUGE = 1e30  # a non-finite norm (an overflowing residual) counts as this
SKIP_C2 = 0.95  # a skip leaves the whole residual; counted as a level that sends 5% of it (a finite cost)
WHOLE_STEP_LEVEL = "int2"  # below every site at this level, a pool sends whole steps at it or skips them


def loop(c2: float) -> float:
    """The squared error a level of relative squared error ``c2`` costs over the steps error feedback
    carries it (``c2 / (1 - c2)``: sent again at the same level each step)."""
    c2 = min(max(c2, 0.0), SKIP_C2)
    return c2 / (1.0 - c2)


class BudgetCodec(Protocol):
    """What the planner needs of the codec (``AdaptiveCompressor`` in budget mode)."""

    typical_errors: tuple[float, ...]  # per level 1..K (skip is 1.0)
    ladder: tuple[str, ...]  # the codec names of levels 1..K

    def level_nbytes(self, level: int, shape: tuple[int, ...], dtype: torch.dtype) -> int: ...  # float32 residuals

    def site_budget(self, shape: tuple[int, ...], dtype: torch.dtype) -> int: ...

    def default_level(self, shape: tuple[int, ...], dtype: torch.dtype) -> int: ...

    def payload_stats(self, payload: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _Seen:
    """One measured call of a step."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    level: int
    stats: Optional[torch.Tensor]  # the payload's 4 stats bytes (device); None: a full send


@dataclass
class _PoolState:
    seen: dict[Site, _Seen] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # calls of each stream in this step
    levels: dict[Site, int] = field(default_factory=dict)  # this step's allocation
    errors: dict[Site, float] = field(default_factory=dict)  # last step's e per site (for the prediction)
    c2: list[float] = field(default_factory=list)  # running c_L^2 per level 1..K
    whole_steps: int = 0  # whole-step decisions made in this run of steps (WHOLE_STEP_LEVEL)


def hull(points: list[tuple[int, float]]) -> list[int]:
    """Indices of the lower convex hull of ``(bytes, error)`` points (sorted by bytes, errors falling),
    from the first point on: the levels worth moving through in order."""
    order = [0]
    for i in range(1, len(points)):
        if points[i][1] >= points[order[-1]][1]:
            continue  # more bytes, no less error
        while len(order) >= 2:
            (b0, e0), (b1, e1), (b2, e2) = points[order[-2]], points[order[-1]], points[i]
            # drop the middle point when it lies on or above the line from the first to the new one
            if (e0 - e1) * (b2 - b0) <= (e0 - e2) * (b1 - b0):
                order.pop()
            else:
                break
        order.append(i)
    return order


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Levels for sites with ``costs[s][L]`` bytes and ``errors[s][L]`` expected squared error at level
    ``L`` (level 0 always affordable): every site starts at 0, then the hull steps with the largest
    error reduction per byte are taken in order while they fit in ``budget``. Ties: site order."""
    levels = [0] * len(costs)
    spent = sum(c[0] for c in costs)
    steps = []
    for s, (c, e) in enumerate(zip(costs, errors)):
        path = hull(list(zip(c, e)))
        for a, b in zip(path, path[1:]):
            steps.append(((e[a] - e[b]) / max(c[b] - c[a], 1), s, a, b))
    steps.sort(key=lambda t: (-t[0], t[1], t[2]))
    stopped: set[int] = set()
    for _, s, a, b in steps:
        if s in stopped or levels[s] != a:
            continue
        extra = costs[s][b] - costs[s][a]
        if spent + extra > budget:
            stopped.add(s)  # the site's later steps are dearer per unit of error: it stays here
            continue
        levels[s], spent = b, spent + extra
    while True:  # what is left: any finer level that still fits, best reduction per byte first
        best: Optional[tuple[float, int, int]] = None
        for s, (c, e) in enumerate(zip(costs, errors)):
            for b in range(levels[s] + 1, len(c)):
                extra = c[b] - c[levels[s]]
                if 0 < extra <= budget - spent and e[b] < e[levels[s]]:
                    gain = (e[levels[s]] - e[b]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, s, b)
        if best is None:
            return levels
        _, s, b = best
        spent += costs[s][b] - costs[s][levels[s]]
        levels[s] = b


class BudgetPlanner:
    """The allocation of one Session's budgeted ``auto`` (see the module docstring)."""

    def __init__(self, codec: BudgetCodec) -> None:
        self.codec = codec
        self.pools: dict[Pool, _PoolState] = {}
        self.current: Optional[tuple[int, int]] = None  # (request, step) of the current allocation
        self.run_steps: Optional[int] = None  # steps of the last run of steps that ended (a request's)
        self.rolls = 0  # allocations made (tests)

    def clear(self) -> None:
        self.pools.clear()
        self.current = None
        self.run_steps = None

    def _pool(self, pool: Pool) -> _PoolState:
        state = self.pools.get(pool)
        if state is None:
            state = self.pools[pool] = _PoolState(c2=[c * c for c in self.codec.typical_errors])
        return state

    def begin(self, request: int, step: int) -> None:
        """Called at every budgeted call: on the first call of a step, allocate it from the previous
        step's measurements (the next step of the same request) or forget them (any other jump)."""
        now = (request, step)
        if self.current == now:
            return
        follows = self.current is not None and self.current == (request, step - 1)
        if not follows and self.current is not None:
            self.run_steps = self.current[1] + 1  # the next run is expected to be as long (whole steps)
        self.current = now
        if follows:
            self._roll()
        else:
            for state in self.pools.values():
                state.seen.clear()
                state.levels.clear()
                state.errors.clear()
                state.whole_steps = 0
        for state in self.pools.values():
            state.counts.clear()

    def site(self, pool: Pool, stream: str) -> Site:
        """The site of the next call of ``stream`` on ``pool`` in this step (counts the call)."""
        state = self._pool(pool)
        n = state.counts.get(stream, 0)
        state.counts[stream] = n + 1
        return (stream, n)

    def level(self, pool: Pool, site: Site, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The level ``site`` sends at in this step (sender and receivers get the same)."""
        level = self._pool(pool).levels.get(site)
        return self.codec.default_level(shape, dtype) if level is None else level

    def observe(self, pool: Pool, site: Site, shape: tuple[int, ...], dtype: torch.dtype, level: int,
                stats: Optional[torch.Tensor]) -> None:
        """Keep a payload's stats bytes (a copy) for the next step's allocation; ``stats`` ``None``: a full
        send (the site takes part in the next allocation with the pool's mean residual)."""
        self._pool(pool).seen[site] = _Seen(tuple(shape), dtype, level, None if stats is None else stats.clone())

    def _roll(self) -> None:
        """Allocate the new step of every pool from the last step's measurements (one host read)."""
        entries = [(state, site, seen) for state in self.pools.values() for site, seen in sorted(state.seen.items())]
        stats = [seen.stats for _, _, seen in entries if seen.stats is not None]
        values = iter(torch.stack(stats).view(torch.bfloat16).float().tolist() if stats else [])
        measured: dict[int, list[tuple[Site, _Seen, float, float]]] = {}
        for state, site, seen in entries:
            r, e = (v if math.isfinite(v) else HUGE for v in next(values)) if seen.stats is not None else (0.0, 0.0)
            measured.setdefault(id(state), []).append((site, seen, r, e))
        self.rolls += 1
        for state in self.pools.values():
            rows = measured.get(id(state), [])
            self._learn(state, rows)
            state.levels = self._allocate(state, rows)
            state.errors = {site: e for site, seen, _, e in rows if seen.stats is not None}
            state.seen.clear()

    def _learn(self, state: _PoolState, rows: list[tuple[Site, _Seen, float, float]]) -> None:
        """Follow the measured relative error of each level used in the step."""
        for level in range(1, len(state.c2) + 1):
            r2 = sum(r * r for _, seen, r, _ in rows if seen.level == level and seen.stats is not None)
            e2 = sum(e * e for _, seen, _, e in rows if seen.level == level and seen.stats is not None)
            if r2 > 0 and math.isfinite(r2) and math.isfinite(e2):
                state.c2[level - 1] = (1 - EMA) * state.c2[level - 1] + EMA * min(e2 / r2, 1.0)

    def _allocate(self, state: _PoolState, rows: list[tuple[Site, _Seen, float, float]]) -> dict[Site, int]:
        codec = self.codec
        levels = range(len(state.c2) + 1)
        costs = [[codec.level_nbytes(level, seen.shape, torch.float32) for level in levels] for _, seen, _, _ in rows]
        budget = sum(codec.site_budget(seen.shape, seen.dtype) for _, seen, _, _ in rows)
        whole = self._whole_step(state, costs, budget)
        if whole is not None:  # whole steps need no residual estimates
            return {site: whole for site, _, _, _ in rows}
        predicted = [None if seen.stats is None else max(r * r - state.errors.get(site, 0.0) ** 2, 0.0) + e * e
                     for site, seen, r, e in rows]
        known = [n2 for n2 in predicted if n2 is not None]
        mean = sum(known) / len(known) if known else 1.0
        # error feedback carries a level's error into the next steps: c^2 n^2 (1 + c^2 + c^4 + ...);
        # a full send has no residual measured yet: the pool's mean
        errors = [[(mean if n2 is None else n2) * loop(c2) for c2 in (SKIP_C2, *state.c2)] for n2 in predicted]
        chosen = self._toward_the_end(costs, allocate(costs, errors, budget))
        return {site: level for (site, _, _, _), level in zip(rows, chosen)}

    def _coarser(self, level: int) -> int:
        """The level a site steps down to for :meth:`_toward_the_end`: the next coarser one, skip
        rather than int1 (skipping a step beats int1's sign code, as for whole steps)."""
        below = level - 1
        return 0 if below > 0 and self.codec.ladder[below - 1] == "int1" else below

    def _toward_the_end(self, costs: list[list[int]], levels: list[int]) -> list[int]:
        """``levels`` moved where the run's length is known (as long as the last run): the last step
        one level finer at every site that sends - its error reaches the output with no later step
        to correct it - paid for by the first ``S`` compressed steps one level coarser (skip instead
        of int1; ``S`` the fewest whose savings cover it); else unchanged."""
        assert self.current is not None  # set by begin() before any allocation
        if self.run_steps is None or not costs:
            return levels
        step, last, top = self.current[1], self.run_steps - 1, len(costs[0]) - 1
        extra = sum(c[lv + 1] - c[lv] for c, lv in zip(costs, levels) if 0 < lv < top)
        saving = sum(c[lv] - c[self._coarser(lv)] for c, lv in zip(costs, levels) if lv > 0)
        if extra <= 0 or saving <= 0:
            return levels
        early = math.ceil(extra / saving)
        if 1 + early >= last:  # too short a run to pay for it before its last step
            return levels
        if step == last:
            return [lv + 1 if 0 < lv < top else lv for lv in levels]
        if 1 <= step <= early:
            return [self._coarser(lv) if lv > 0 else 0 for lv in levels]
        return levels

    def _whole_step(self, state: _PoolState, costs: list[list[int]], budget: int) -> Optional[int]:
        """The level of every site this step when the pool's ``budget`` is below every site at
        :data:`WHOLE_STEP_LEVEL`: that level on an evenly spread share of the steps, else skip.
        Spread from the end of the run when its length is known (as long as the last run: the last
        step is always sent), else from the start (after ``k`` such steps, ``round(k * share)`` were
        sent). ``None``: the budget affords every site at it (or the ladder lacks it): allocate per site."""
        if WHOLE_STEP_LEVEL not in self.codec.ladder:
            return None
        level = 1 + self.codec.ladder.index(WHOLE_STEP_LEVEL)
        skips, sends = sum(c[0] for c in costs), sum(c[level] for c in costs)
        if budget >= sends or sends <= skips:
            return None
        share, k = max(budget - skips, 0) / (sends - skips), state.whole_steps
        state.whole_steps += 1
        assert self.current is not None  # set by begin() before any allocation
        step = self.current[1]
        if self.run_steps is not None and step < self.run_steps:
            k, phase = self.run_steps - 1 - step, 1 - share / 2  # steps after this one; k = 0 sends
        else:
            phase = 0.5
        return level if math.floor((k + 1) * share + phase) > math.floor(k * share + phase) else 0

    def exchange(self, request: int, step: int, stream: str, shape: tuple[int, ...], dtype: torch.dtype, full: bool,
                 sends: list[Pool], receives: list[Pool]) -> "Exchange":
        """One collective's budgeted payloads: the levels this rank sends on each pool of ``sends`` and
        the levels (hence sizes) it receives on each pool of ``receives`` (a full send: level 0 and the
        full payload's size, measured by no one)."""
        self.begin(request, step)
        out = [(pool, self.site(pool, stream)) for pool in sends]
        into = [(pool, self.site(pool, stream)) for pool in receives]
        return Exchange(self, tuple(shape), dtype, full,
                        [(pool, site, 0 if full else self.level(pool, site, shape, dtype)) for pool, site in out],
                        [(pool, site, 0 if full else self.level(pool, site, shape, dtype)) for pool, site in into])

    def describe(self) -> dict[str, Any]:
        """The current allocation per pool (tests, debugging)."""
        return {f"{src}->{'*' if dst is None else dst}": dict(state.levels) for (src, dst), state in self.pools.items()}


@dataclass
class Exchange:
    """The budgeted streams of one collective call (see :meth:`BudgetPlanner.exchange`)."""

    planner: BudgetPlanner
    shape: tuple[int, ...]
    dtype: torch.dtype
    full: bool
    sends: list[tuple[Pool, Site, int]]
    receives: list[tuple[Pool, Site, int]]

    @property
    def send_levels(self) -> list[int]:
        return [level for _, _, level in self.sends]

    def receive_nbytes(self, full_nbytes: int) -> list[int]:
        """The size of each received payload (``full_nbytes``: a full send's)."""
        codec = self.planner.codec
        return [full_nbytes if self.full else codec.level_nbytes(level, self.shape, torch.float32)
                for _, _, level in self.receives]

    def sent(self, payloads: list[torch.Tensor]) -> None:
        """Measure the payloads sent (in the order of ``sends``)."""
        self._observe(self.sends, payloads)

    def received(self, payloads: list[torch.Tensor]) -> None:
        """Measure the payloads received (in the order of ``receives``)."""
        self._observe(self.receives, payloads)

    def _observe(self, streams: list[tuple[Pool, Site, int]], payloads: list[torch.Tensor]) -> None:
        codec = self.planner.codec
        for (pool, site, level), payload in zip(streams, payloads):
            stats = None if self.full else codec.payload_stats(payload)
            self.planner.observe(pool, site, self.shape, self.dtype, level, stats)
