"""torch's functional collectives routed through a hook (integrations/funcol.py) and xfuser's USP
(integrations/xfuser.py), on 2 CPU gloo ranks.

Layouts: torch's ``_templated_ring_attention`` with its K/V all-gather (``ALL_GATHER``, torch's
default) and with its ``permute_tensor`` shift (``ALL_TO_ALL``), and a Ulysses attention written with
``funcol.all_to_all_single``, each in a 2-block model over 4 slowly changing steps. PassthroughHook
and ``none`` give the unrouted run bit for bit, int8 / int2 with error feedback stay within bounds,
``unrouted == 0``, and routed results are AsyncCollectiveTensors waited on at their first use.
xfuser 0.7's USP is run the same way when xfuser is installed (see ``compact_hooks.bench.xfuser_check.import_usp``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from compact_hooks.integrations.funcol import FuncolRouter, route_functional_collectives
from torch import nn

import compact_hooks as ch
from tests.distributed import run_ranks
from tests.funcol_workers import lazy_worker, table_worker, unrouted_worker, xfuser_worker

STEPS, TOKENS = 4, 64
LAYOUTS = ["ring_gather", "ring_permute", "ulysses"]
# Worst step's relative L2 error against the unrouted run (measured: int8 <= 5.3e-4, int2 <= 1.9e-3
# for every layout here and for xfuser's USP); bounds leave about 4-5x room.
BOUNDS = {"int8": 2.5e-3, "int2": 1e-2}
MIN_RATIO = {"int8": 3.0, "int2": 6.0}  # measured int8 3.5-3.9, int2 6.9-8.8
KEYS = {"ring_gather": {"kv"}, "ring_permute": {"kv.hop1"}, "ulysses": {"q", "k", "v", "o"}}


@pytest.fixture(scope="module")
def table() -> list[dict]:
    return run_ranks(table_worker, 2, STEPS, TOKENS)


def _check_rows(rows: dict, layout: str) -> None:
    assert rows[f"{layout}/single"]["err"] < 1e-5, "the unrouted run differs from one process"
    for name in ("passthrough", "none", "int8", "int2"):
        row = rows[f"{layout}/{name}"]
        assert row["unrouted"] == 0, row["unrouted_ops"]
        assert row["routed"] > 0 and row["exact"] == 0
        if name in ("passthrough", "none"):
            assert row["equal"], f"{layout}/{name} is not bit-identical: {row['errs']}"
        else:
            assert 0 < max(row["errs"]) < BOUNDS[name], (layout, name, row["errs"])
            assert row["ratio"] >= MIN_RATIO[name], (layout, name, row["ratio"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_funcol_parity(table: list[dict], layout: str) -> None:
    for rows in table:
        _check_rows(rows, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_funcol_keys_name_module_and_role(table: list[dict], layout: str) -> None:
    expected = sorted(f"blocks.{i}.attn:{role}" for i in range(2) for role in KEYS[layout])
    for rows in table:
        assert rows[f"{layout}/int8"]["keys"] == expected


def test_funcol_results_wait_on_first_use() -> None:
    for rank, res in enumerate(run_ranks(lazy_worker, 2)):
        assert res["type"] == "AsyncCollectiveTensor" and res["view_type"] == "AsyncCollectiveTensor"
        if rank == 0:  # rank 1 joins after rank 0 looked: rank 0's work cannot have completed
            assert res["outstanding_before"] == ["attn:kv"], "the work was waited on before the first use"
            assert res["outstanding_after_view"] == ["attn:kv"], "a view waited"
        else:  # rank 0's block is already there: the work may complete (and be decoded at once) or not
            assert res["outstanding_before"] in ([], ["attn:kv"])
            assert res["outstanding_after_view"] == res["outstanding_before"], "a view waited"
        assert res["outstanding_after_use"] == [], "the first use did not wait"
        expected = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [10.0, 11.0, 12.0], [13.0, 14.0, 15.0]]
        assert res["used"] == expected and res["wait"] == expected
        assert res["stats"]["routed"] == 1


def test_funcol_unrouted_counted_and_removed() -> None:
    for rank, res in enumerate(run_ranks(unrouted_worker, 2)):
        assert res["stats"]["unrouted_ops"] == {
            "funcol.all_reduce": 1, "permute_tensor (not a flat shift to the next rank)": 1,
            "all_gather_single (outside an attention module)": 1}
        assert res["stats"]["exact"] == 1  # the int64 gather inside the attention
        assert res["after"] == res["stats"], "calls after remove() were counted"
        assert res["restored"]
        assert res["values"] == [[3.0] * 4, [float(rank + 1)] * 4, [1, 1, 1, 1, 2, 2, 2, 2]]


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_funcol_arguments_checked() -> None:
    holder = nn.Sequential(_Attention())
    with pytest.raises(TypeError, match="CommHook"):
        route_functional_collectives(object(), holder)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        route_functional_collectives(ch.PassthroughHook(), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention="):
        route_functional_collectives(ch.PassthroughHook(), nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="role kind"):
        FuncolRouter(ch.PassthroughHook()).hint("x")
    with route_functional_collectives(ch.PassthroughHook(), holder, modules=(), attention=(_Attention,)) as h:
        assert h.router.active
    assert not h.router.active


@pytest.mark.skipif(importlib.util.find_spec("xfuser") is None,
                    reason="xfuser is not installed (pip install --no-deps xfuser==0.7.0 sentencepiece "
                           "beautifulsoup4 soupsieve distvae av peft; see docs/diffusers.md)")
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_xfuser_usp(ulysses: int, ring: int) -> None:
    keys = {"separate": {"q", "k", "v", "o"}, "combined": {"qkv", "o"}} if ulysses > 1 else \
        {"separate": {"kv"}, "combined": {"kv"}}
    for rows in run_ranks(xfuser_worker, 2, ulysses, ring, STEPS, TOKENS):
        for layout in ("separate", "combined"):
            _check_rows(rows, layout)
            assert rows[f"{layout}/int2"]["keys"] == sorted(
                f"blocks.{i}.attn:{role}" for i in range(2) for role in keys[layout])
