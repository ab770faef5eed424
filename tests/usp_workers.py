"""Rank functions of the USP and link-aware tests (run by ``tests.distributed.run_ranks`` or mpirun).

Each returns plain numbers and strings; the tests assert on them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.hooks import CompactHook, PassthroughHook
from compact_hooks.hooks.links import LinkAwareHook
from compact_hooks.topology import Topology, group_ranks

# (tag, family, model kwargs, input kwargs); "odd" token counts don't divide 4
USP_CASES = [
    ("flux", "flux", {}, {}),
    ("flux-odd", "flux", {}, {"height": 3, "width": 3, "text": 3}),
    ("sd3", "sd3", {}, {}),
    ("sd3-odd", "sd3", {}, {"height": 5, "width": 5, "text": 7}),
    ("cogvideox-odd", "cogvideox", {}, {"height": 6, "width": 6}),
]


FULL_CASES = ("flux", "sd3-odd")  # every layout; the other cases run the 2x2 ones (test time)
FULL_LAYOUTS = ("2x2", "2x2-interleaved")


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class Recorder(CommHook):
    """PassthroughHook that records (op, key, global ranks of the group) of every call."""

    def __init__(self) -> None:
        self.inner = PassthroughHook()
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def __call__(self, call: CollectiveCall) -> torch.Tensor:
        self.calls.append((call.op, str(call.key), group_ranks(call.group)))
        return self.inner(call)


def _layouts(rank: int) -> dict[str, tuple[Optional[int], Optional[int], Optional[Topology]]]:
    """name -> (ulysses_degree, ring_degree, topology): the grids the parity test runs."""
    return {
        "2x2": (2, 2, None),  # one real host: consecutive Ulysses groups {0,1} {2,3}
        "2x2-interleaved": (None, None, Topology(f"h{rank % 2}")),  # hosts {0,2} {1,3}: degrees from them
        "4x1": (4, 1, None),
        "1x4": (1, 4, None),
        "hosts": (None, None, None),  # degrees and groups from the real hostnames
    }


def usp_parity_worker(rank: int, world: int, cases: list = USP_CASES, layouts: Optional[list[str]] = None) -> dict:
    """USP (PassthroughHook) vs the single-process model; the groups and keys of every collective."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import attention_processors, parallelize
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS, tiny_inputs

    out: dict[str, Any] = {"hosts": list(Topology().hosts(None))}
    all_layouts = _layouts(rank)
    for tag, family, model_kw, input_kw in cases:
        model = TINY_MODELS[family](**model_kw)
        inp = tiny_inputs(family, model, **input_kw)
        with torch.no_grad():
            ref = model(**inp)[0]
        stock = {k: type(p) for k, p in attention_processors(model).items()}
        for name in layouts or [n for n in all_layouts if n in FULL_LAYOUTS or (tag in FULL_CASES and n != "hosts")]:
            u, r, topo = all_layouts[name]
            rec = Recorder()
            handle = parallelize(model, None, mode="usp", hook=rec, ulysses_degree=u, ring_degree=r, topology=topo)
            usp = handle.state.comm.usp
            with torch.no_grad():
                y = model(**inp)[0]
                y2 = model(**inp)[0]
            handle.remove()
            ulysses_ranks = group_ranks(usp.ulysses)
            ring_ranks = group_ranks(usp.ring)
            ops: dict[str, list] = {}
            for op, key, ranks in rec.calls:
                kind = key.rsplit(":", 1)[-1].split(".")[0]
                ops.setdefault(kind, []).append((op, ranks == ulysses_ranks, ranks == ring_ranks))
            out[f"{tag}:{name}"] = {
                "err": rel_max(y, ref), "repeat": rel_max(y2, y), "shape": list(y.shape) == list(ref.shape),
                "grid": [list(row) for row in usp.grid], "ulysses": list(ulysses_ranks), "ring": list(ring_ranks),
                "kinds": {k: [list(t) for t in sorted(set(v))] for k, v in ops.items()}, "calls": len(rec.calls),
            }
        with torch.no_grad():
            restored = model(**inp)[0]
        out[f"{tag}:removed"] = (float((restored - ref).abs().max()) == 0.0
                                 and stock == {k: type(p) for k, p in attention_processors(model).items()})
    out["errors"] = usp_errors(rank, world)
    return out


def usp_errors(rank: int, world: int) -> dict[str, str]:
    """User errors of mode='usp' (each raised before any collective)."""
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS

    got: dict[str, str] = {}
    model = TINY_MODELS["flux"]()
    for name, kwargs in {"product": dict(ulysses_degree=3, ring_degree=2),
                         "not_usp": dict(mode="ulysses", ulysses_degree=2),
                         "heads": dict(ulysses_degree=4, ring_degree=1, model=TINY_MODELS["flux"](heads=2))}.items():
        m = kwargs.pop("model", model)
        try:
            parallelize(m, None, **{"mode": "usp", **kwargs}).remove()
            got[name] = "no error"
        except ValueError as exc:
            got[name] = str(exc)
    return got


def link_worker(rank: int, world: int, fake_hosts: bool = True) -> dict:
    """Topology and LinkAwareHook on hosts {0,1} and {2,3} (``fake_hosts``: named ``host0``/``host1``,
    else the real hostnames of emulated hosts): routing, stats, exactness."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS, tiny_inputs

    topo = Topology(f"host{rank // 2}") if fake_hosts else Topology()
    out: dict[str, Any] = {"world_hosts": list(topo.hosts(None))}
    groups = {name: dist.new_group(ranks) for name, ranks in
              (("intra", [0, 1]), ("intra2", [2, 3]), ("inter", [0, 2]), ("inter2", [1, 3]))}
    mine = {"intra": groups["intra"] if rank < 2 else groups["intra2"],
            "inter": groups["inter"] if rank % 2 == 0 else groups["inter2"]}
    out["classes"] = {n: topo.link_class(g) for n, g in mine.items()}
    out["world_class"] = topo.link_class(None)
    out["exchanges"] = topo.exchanges  # the sub-groups are derived from the world's hostnames

    hook = LinkAwareHook(CompactHook({"compressor": "int2", "residual": "ef", "warmup_steps": 1, "warmup_compressor": None}),
                         PassthroughHook(),
                         topo)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 64, 32, generator=gen) + rank
    exact: dict[str, bool] = {}
    for step in range(3):
        xs = x + 0.05 * step
        for name in ("intra", "inter"):
            g = mine[name]
            got = hook(CollectiveCall("all_to_all", xs, g, key=f"probe:{name}"))
            plain = PassthroughHook()(CollectiveCall("all_to_all", xs, g))
            exact[f"{name}{step}"] = bool(torch.equal(got, plain))
        hook.next_step()
    out["exact"] = exact
    out["links"] = hook.stats()["links"]

    # the model: USP 2x2 over these hosts, inter-host only vs every hop vs plain
    model = TINY_MODELS["flux"](heads=4, head_dim=16)
    inp = tiny_inputs("flux", model, height=8, width=8, text=8)
    results: dict[str, torch.Tensor] = {}
    for policy in ("plain", "inter_host", "all"):
        if policy == "plain":
            h: CommHook = PassthroughHook()
        else:
            compress = ("inter_host",) if policy == "inter_host" else ("intra_host", "inter_host")
            h = LinkAwareHook(CompactHook({"compressor": "int2", "warmup_steps": 1}), PassthroughHook(), topo,
                              compress=compress)
        handle = parallelize(model, None, mode="usp", hook=h, topology=topo)
        with torch.no_grad():
            for step in range(3):  # drifting latents, as in denoising: residuals are not zero
                y = model(**{**inp, "hidden_states": inp["hidden_states"] * (1.0 + 0.1 * step)})[0]
        handle.remove()
        results[policy] = y
        if policy != "plain":
            out[f"model:{policy}"] = h.stats()["links"]
    out["model_err"] = {p: rel_max(results[p], results["plain"]) for p in ("inter_host", "all")}
    return out


# name -> (host of each rank, ulysses_degree, ring_degree); the world size is len(hosts). Hosts are
# emulated by Topology(hostname): "abab..." is mpirun --map-by node (round-robin over hosts), "aabb..."
# --map-by slot (contiguous). "*" marks the placements whose ring groups, ordered by global rank, are
# not a rotation of the grid's rows (tests/test_usp_placement.py checks that some are).
PLACEMENTS: dict[str, tuple[str, int, int]] = {
    "rr2:u2r4": ("abababab", 2, 4),  # * 2 hosts x 4 ranks, round-robin
    "blk2:u2r4": ("aaaabbbb", 2, 4),  # 2 hosts x 4 ranks, contiguous
    "rr4:u2r4": ("abcdabcd", 2, 4),  # 4 hosts x 2 ranks, round-robin
    "rr2:u1r8": ("abababab", 1, 8),  # *
    "rr3:u2r3": ("abcabc", 2, 3),  # 3 hosts x 2 ranks, round-robin
    "blk3:u2r3": ("aabbcc", 2, 3),  # 3 hosts x 2 ranks, contiguous
    "rr-uneven:u2r3": ("ababaa", 2, 3),  # * round-robin over hosts of 4 and 2 slots
    "rev3:u2r3": ("abccba", 2, 3),  # *
    "rr2:u2r3": ("ababab", 2, 3),  # 3 ranks per host: consecutive Ulysses groups
    "rr3:u1r6": ("abcabc", 1, 6),  # *
}
PLACEMENT_INPUT = {"height": 5, "width": 5, "text": 7}  # 25 image and 7 text tokens: padded on 6 and 8 ranks
PLACEMENT_STEPS = 3  # drifting latents: step 0 is int2's warm-up (full sends), steps 1-2 are residuals


def usp_placement_worker(rank: int, world: int) -> dict:
    """USP on every placement of :data:`PLACEMENTS` over ``world`` ranks: PassthroughHook and int2
    (warm-up 1) vs the single-process model at each of :data:`PLACEMENT_STEPS` drifting steps."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS, tiny_inputs

    model = TINY_MODELS["flux"]()
    inp = tiny_inputs("flux", model, **PLACEMENT_INPUT)
    steps = [{**inp, "hidden_states": inp["hidden_states"] * (1.0 + 0.1 * s)} for s in range(PLACEMENT_STEPS)]
    with torch.no_grad():
        refs = [model(**x)[0] for x in steps]
    out: dict[str, Any] = {}
    for name, (hosts, u, r) in PLACEMENTS.items():
        if len(hosts) != world:
            continue
        topo = Topology(hosts[rank])
        res: dict[str, Any] = {}
        for label, hook in (("plain", PassthroughHook()),
                            ("int2", CompactHook({"compressor": "int2", "warmup_steps": 1}))):
            handle = parallelize(model, None, mode="usp", hook=hook, ulysses_degree=u, ring_degree=r, topology=topo)
            usp = handle.state.comm.usp
            with torch.no_grad():
                res[label] = [rel_max(model(**x)[0], ref) for x, ref in zip(steps, refs)]
            handle.remove()
        ring = hook.stats()["per_key"]
        res["int2_ring"] = [sum(v[f] for k, v in ring.items() if ":ring_" in k) for f in ("raw_bytes", "wire_bytes")]
        res["grid"] = [list(row) for row in usp.grid]
        res["ring"] = list(group_ranks(usp.ring))
        res["sources"] = list(getattr(usp, "sources", ()))
        out[name] = res
    return out


MARK = "@@RESULT "


def main() -> int:
    """Under mpirun (2 emulated hosts x 2 ranks): USP parity with groups from the real hostnames and
    the link-aware checks; rank 0 prints ``@@RESULT`` with every rank's results."""
    import json
    import socket

    from compact_hooks.launcher.mpi import init_distributed

    torch.set_num_threads(1)
    group = init_distributed(timeout_s=300)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        res = {"hostname": socket.gethostname(),
               "parity": usp_parity_worker(rank, world, USP_CASES[:4], ["hosts", "2x2"]),
               "links": link_worker(rank, world, fake_hosts=False)}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, res, group=group)
        if rank == 0:
            print(MARK + json.dumps({"ranks": every}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def link_property_worker(rank: int, world: int, examples: int = 30) -> list:
    """Hypothesis (derandomized: every rank draws the same examples; nothing raises inside, so no rank
    shrinks alone): random host assignments, groups and policies; one record per example."""
    torch.set_num_threads(1)
    from hypothesis import given, settings
    from hypothesis import strategies as st

    records: list = []
    policies = [(), ("inter_host",), ("intra_host", "inter_host")]

    @settings(derandomize=True, deadline=None, max_examples=examples, database=None)
    @given(hosts=st.lists(st.integers(0, 2), min_size=world, max_size=world),
           members=st.sets(st.integers(0, world - 1), min_size=2), policy=st.sampled_from(policies))
    def check(hosts: list, members: set, policy: tuple) -> None:
        ranks = sorted(members)
        group = dist.new_group(ranks)  # every rank creates every group
        if rank not in ranks:
            records.append(None)
            return
        topo = Topology(f"n{hosts[rank]}")
        compressed = CompactHook({"compressor": "int2", "warmup_steps": 0})
        hook = LinkAwareHook(compressed, PassthroughHook(), topo, compress=policy)
        x = torch.randn(2 * len(ranks), 512, generator=torch.Generator().manual_seed(rank))
        exact = True
        for step in range(2):  # the first exchange of a key is a full send, the second a residual
            xs = x * (1.0 + 0.01 * step)
            y = hook(CollectiveCall("all_to_all", xs, group, key="probe"))
            exact &= bool(torch.equal(y, PassthroughHook()(CollectiveCall("all_to_all", xs, group))))
        links = hook.stats()["links"]
        expect = "intra_host" if len({hosts[r] for r in ranks}) == 1 else "inter_host"
        records.append({"link": topo.link_class(group), "expect": expect, "compressed": expect in policy,
                        "inner_calls": compressed.stats().get("calls", 0), "exact": exact,
                        "raw": links[expect]["raw_bytes"], "wire": links[expect]["wire_bytes"],
                        "other_calls": sum(s["calls"] for c, s in links.items() if c != expect)})

    check()
    return records
