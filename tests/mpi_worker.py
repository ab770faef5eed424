"""Rank program for the multi-host tests; start it with mpirun (or ``compact-hooks launch``).

``python mpi_worker.py hello [--exit-code N --fail-rank R]``
    init_distributed(), then rank 0 prints ``@@RESULT {"hostnames": [...], ...}``; with
    ``--exit-code`` rank R exits with code N afterwards (exit-code propagation).
``python mpi_worker.py serve``
    init_distributed(), then rank 0 reads one JSON case per line from stdin (``quit`` or EOF ends),
    every rank runs it and rank 0 prints ``@@RESULT {"ranks": [per-rank result, ...]}``. The process
    group stays alive across cases (a fresh mpirun per Hypothesis example would cost seconds).

A case: ``{"compressor": spec, "residual": mode, "shape": [...], "dtype": "float32", "steps": 4,
"warmup_steps": 1, "ops": ["all_gather", "all_to_all", "all_reduce"], "seed": 0}``. Every rank can
compute every rank's input (seeded by rank and step), so each checks its own result against the exact
collective: exact for a lossless codec, else within the codec's one-shot error on the same data;
the bytes that went through torch.distributed against the declared payload sizes and ``stats()``; and
reports its channel base digests and hostname so the test can compare them across ranks.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from compact_hooks.launcher.mpi import init_distributed

MARK = "@@RESULT "
DRIFT = 0.1  # per-step change of the inputs, relative to their size (adjacent denoising steps)


class WireMeter:
    """Counts the bytes this rank sends through torch.distributed (ring / pairwise convention)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bytes = 0
        self.originals: dict[str, Any] = {}

    def install(self) -> None:
        def wrap(name: str, sent) -> None:
            original = getattr(dist, name, None)
            if original is None:
                return
            self.originals[name] = original

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.bytes += sent(*args, **kwargs)
                return original(*args, **kwargs)

            setattr(dist, name, counted)

        p = self.size
        gathered = lambda out, inp, *a, **k: (p - 1) * inp.numel() * inp.element_size()
        wrap("all_gather_into_tensor", gathered)
        wrap("all_gather_single", gathered)
        wrap("all_to_all_single", lambda out, inp, *a, **k: (p - 1) * inp.numel() * inp.element_size() // p)
        wrap("all_reduce", lambda t, *a, **k: 2 * (p - 1) * t.numel() * t.element_size() // p)

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)
        self.originals.clear()


def make_input(case: dict[str, Any], src: int, step: int, op: str, size: int) -> torch.Tensor:
    """Rank ``src``'s input of ``op`` at ``step``: a fixed tensor plus a small random walk."""
    shape = list(case["shape"])
    if op == "all_to_all":
        shape[0] *= size  # dim 0 splits into `size` equal chunks
    dtype = getattr(torch, case["dtype"])
    op_id = ("all_gather", "all_to_all", "all_reduce").index(op)
    g = torch.Generator().manual_seed(case["seed"] * 1_000_003 + src * 1009 + op_id * 17)
    x = torch.randn(shape, generator=g)
    for _ in range(step):
        x = x + DRIFT * torch.randn(shape, generator=g)
    return x.to(dtype)


def reference(op: str, xs: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """The exact collective."""
    if op == "all_gather":
        return torch.cat(xs, dim=0)
    if op == "all_to_all":
        return torch.cat([x.chunk(size, dim=0)[rank] for x in xs], dim=0)
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    return total.to(xs[0].dtype)


def pieces(op: str, x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The tensors the codec compresses for ``x`` (whole, dim-0 chunks, or the all_reduce chunks)."""
    from compact_hooks.collectives import reduce_chunks

    if op == "all_gather":
        return [x]
    if op == "all_to_all":
        return list(x.chunk(size, dim=0))
    return reduce_chunks(x, size)


def goes_plain(op: str, x: torch.Tensor, size: int, session: Any) -> bool:
    """Whether ``op`` of ``x`` takes the plain collective: a lossless codec, or compressed payloads
    that would not be smaller than what the plain collective sends."""
    from compact_hooks.collectives import plain_is_cheaper

    return session.is_lossless(x.dtype) or plain_is_cheaper(session, op, x, size)


def plain_bytes(op: str, nbytes: int, size: int) -> int:
    from compact_hooks.collectives import plain_bytes as declared

    return declared(op, nbytes, size)


def one_shot_error(compressor: Any, ts: list[torch.Tensor]) -> float:
    """Largest relative error of one encode/decode of the float32 tensors ``ts``."""
    worst = 0.0
    for t in ts:
        t = t.float().contiguous()
        norm = float(t.norm())
        if norm == 0.0:
            continue
        back = compressor.decode(compressor.encode(t), tuple(t.shape), torch.float32)
        worst = max(worst, float((back - t).norm()) / norm)
    return worst


def declared_bytes(op: str, x: torch.Tensor, size: int, session: Any, full: bool, first: bool) -> tuple[int, int]:
    """``(payload bytes, protocol bytes)`` this rank should send for ``op`` by the declared sizes
    (ring / pairwise convention); ``first``: the key's first exchange, which also shares a header
    verdict per compressed stage (protocol bytes: not in the stats' wire bytes)."""
    from compact_hooks.collectives.protocol import VERDICT_NBYTES

    nbytes = x.numel() * x.element_size()
    compressor = session.compressor
    if goes_plain(op, x, size, session):
        return plain_bytes(op, nbytes, size), 0
    if op == "all_reduce" and compressor.summable:  # a cast summed by all_reduce in its wire dtype
        wire = torch.empty((), dtype=getattr(compressor, "wire_dtype", x.dtype)).element_size()
        return 2 * (size - 1) * x.numel() * wire // size, 0
    piece = pieces(op, x, size)[0]
    payload = session.payload_nbytes(tuple(piece.shape), x.dtype, full)
    stages = 2 if op == "all_reduce" else 1
    verdicts = stages * (size - 1) * VERDICT_NBYTES if first else 0
    return (size - 1) * payload * stages, verdicts


def norm(t: torch.Tensor) -> float:
    return float(t.double().norm())


def run_case(case: dict[str, Any], group: Any, rank: int, size: int) -> dict[str, Any]:
    import compact_hooks as ch

    dtype = getattr(torch, case["dtype"])
    ops, steps, warmup = case["ops"], case["steps"], case["warmup_steps"]
    # full sends are the tensor's own bytes (checked exact below), not the default int8 warm-up codec
    config = {"compressor": case["compressor"], "residual": case["residual"], "warmup_steps": warmup,
              "warmup_compressor": None}
    hook = ch.CompactHook(config)
    compressor = ch.build_compressor(case["compressor"])
    lossless = compressor.is_lossless(dtype)
    agree = getattr(getattr(ch, "collectives", None), "agree_on_settings", None)
    if agree is not None:  # the one-off settings exchange, so the meter sees payloads only
        agree(hook.session, group)
    agree_tensor = getattr(getattr(ch, "collectives", None), "agree_on_tensor", None)
    if agree_tensor is not None:  # and the one-off shape check of each call site
        for op in ops:
            agree_tensor(hook.session, group, f"t.{op}", op, make_input(case, rank, 0, op, size))
    problems: list[str] = []
    meter = WireMeter(size)
    declared = 0
    compressed_ops = 0
    worst: dict[str, float] = {}
    meter.install()
    try:
        for step in range(steps):
            for op in ops:
                xs = [make_input(case, j, step, op, size) for j in range(size)]
                x = xs[rank]
                before = meter.bytes
                y = hook(ch.CollectiveCall(op, x, group, key=f"t.{op}"))
                sent = meter.bytes - before
                full = step < max(1, warmup)
                expect, protocol = declared_bytes(op, x, size, hook.session, full, step == 0)
                lossless_here = lossless or goes_plain(op, x, size, hook.session)
                compressed_ops += not lossless_here
                declared += expect
                expect += protocol
                where = f"step {step} {op}"
                if sent != expect:
                    problems.append(f"{where}: {sent} bytes went through torch.distributed, declared {expect}")
                ref = reference(op, xs, rank, size)
                if y.shape != ref.shape or y.dtype != ref.dtype:
                    problems.append(f"{where}: result {tuple(y.shape)} {y.dtype}, "
                                    f"expected {tuple(ref.shape)} {ref.dtype}")
                    continue
                if op != "all_reduce":
                    own = y.chunk(size, dim=0)[rank]
                    mine = x if op == "all_gather" else x.chunk(size, dim=0)[rank]
                    if not torch.equal(own, mine):
                        problems.append(f"{where}: this rank's own slice is not its exact input")
                err = norm(y.double() - ref.double())
                plain_reduce = op == "all_reduce" and lossless_here  # gloo's own summation order
                summed = op == "all_reduce" and (plain_reduce or compressor.summable)
                if (full or lossless_here) and not summed:
                    if not torch.equal(y, ref):
                        problems.append(f"{where}: {'full send' if full else 'plain path'} not exact "
                                        f"(error {err:.3g})")
                    continue
                compressed = [p for t in xs for p in pieces(op, t, size)]
                if op == "all_reduce":  # the reduced chunks are compressed again
                    compressed += pieces(op, ref, size)
                e1 = 0.0 if lossless_here else one_shot_error(compressor, compressed)
                scale = norm(ref) if op != "all_reduce" else sum(norm(t) for t in xs) + norm(ref)
                floor = torch.finfo(dtype).eps * (steps + 2) * scale
                bound = 1.5 * e1 * scale + floor
                worst[op] = max(worst.get(op, 0.0), err / scale if scale else 0.0)
                if not err <= bound:
                    problems.append(f"{where}: error {err:.4g} exceeds the codec bound {bound:.4g} "
                                    f"(one-shot relative error {e1:.3g}, scale {scale:.3g})")
            hook.next_step()
    finally:
        meter.uninstall()
    stats = hook.stats()
    if stats.get("wire_bytes") != declared:
        problems.append(f"stats() reports {stats.get('wire_bytes')} wire bytes, declared {declared}")
    return {
        "rank": rank,
        "hostname": socket.gethostname(),
        "problems": problems,
        "lossless": lossless,
        "compressed_ops": compressed_ops,
        "digests": hook.session.base_digests(),
        "wire_bytes": stats.get("wire_bytes"),
        "declared_bytes": declared,
        "worst_rel_error": worst,
    }


def serve(group: Any, rank: int, size: int) -> None:
    while True:
        line = [sys.stdin.readline() if rank == 0 else None]
        dist.broadcast_object_list(line, src=0, group=group)
        text = (line[0] or "").strip()
        if text in ("", "quit"):
            return
        case = json.loads(text)
        try:
            result = run_case(case, group, rank, size)
        except Exception:  # reported to the test, which fails the example with it
            result = {"rank": rank, "hostname": socket.gethostname(), "error": traceback.format_exc()}
        results = [None] * size if rank == 0 else None
        dist.gather_object(result, results, dst=0, group=group)
        if rank == 0:
            print(MARK + json.dumps({"case": case, "ranks": results}), flush=True)


def hello(group: Any, rank: int, size: int) -> None:
    import os

    names: list[Any] = [None] * size
    dist.all_gather_object(names, socket.gethostname(), group=group)
    if rank == 0:
        print(MARK + json.dumps({"world_size": size, "hostnames": names, "master_addr": os.environ["MASTER_ADDR"],
                                 "master_port": os.environ["MASTER_PORT"]}), flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("hello", "serve"))
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--timeout", type=float, default=120.0)
    args, _ = p.parse_known_args(argv)  # tolerate the deepspeed launcher's --local_rank
    group = init_distributed(timeout_s=args.timeout)
    rank, size = dist.get_rank(), dist.get_world_size()
    (hello if args.mode == "hello" else serve)(group, rank, size)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return args.exit_code if rank == args.fail_rank else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
