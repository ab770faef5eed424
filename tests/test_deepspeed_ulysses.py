"""Ulysses through compact-hooks under the real DeepSpeed launcher (2 CPU ranks, gloo).

The module is its own worker: ``deepspeed --num_gpus 2 tests/test_deepspeed_ulysses.py OUT`` runs
:func:`worker` on every rank; rank 0 writes the results as JSON and the tests below read them. One
launch covers every check (a DeepSpeed start costs several seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from compact_hooks.launcher.local import free_port

WORLD = 2
TIMEOUT_S = 240
CODEC_BOUNDS = {"int8": 0.005, "int2": 0.1}  # max relative output error over 10 drifting steps (measured 4e-4, 0.04)
STEPS = 10


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def launch(script: Path, nprocs: int, out: Path, timeout: int = TIMEOUT_S) -> dict[str, Any]:
    """Run ``script OUT`` under ``deepspeed --num_gpus nprocs`` on CPU; return rank 0's JSON."""
    exe = Path(sys.executable).parent / "deepspeed"
    cmd = [str(exe), "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(script), str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    results = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or not results.get("done"):
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"deepspeed launch failed (rc {proc.returncode}); results so far {results}\n{tail}")
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    return launch(Path(__file__).resolve(), WORLD, tmp_path_factory.mktemp("ulysses") / "results.json")


# ---------------------------------------------------------------------------------------------
# Tests (read the worker's results)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["passthrough", "none"])
@pytest.mark.parametrize("batch_dim_idx", [0, 1])
@pytest.mark.parametrize("gather_idx", [0, 1])
def test_equals_deepspeed_exactly(results: dict[str, Any], hook: str, batch_dim_idx: int, gather_idx: int) -> None:
    r = results["exact"][f"{hook}/b{batch_dim_idx}/g{gather_idx}"]
    assert r == {"out": True, "dq": True, "dk": True, "dv": True}


def test_keys_and_calls(results: dict[str, Any]) -> None:
    """Q, K and V in one all-to-all (2 collectives per forward, not 4); three where their shapes differ
    (grouped-query attention) or a rule tells the roles apart."""
    assert results["keys"] == {"fused": ["attn:qkv", "attn:o"], "gqa": ["attn:q", "attn:k", "attn:v", "attn:o"],
                               "role_rule": ["attn:q", "attn:k", "attn:v", "attn:o"]}


def test_indivisible_heads_raise(results: dict[str, Any]) -> None:
    assert "heads are not divisible" in results["errors"]["heads"]


def test_unequal_sequence_raises(results: dict[str, Any]) -> None:
    msg = results["errors"]["seq"]
    assert "not divisible" in msg and "pad the sequence to 8" in msg


def test_split_sequence_raises(results: dict[str, Any]) -> None:
    assert "pad the sequence to 8" in results["errors"]["split"]


@pytest.mark.parametrize("codec", sorted(CODEC_BOUNDS))
def test_lossy_error_bounded(results: dict[str, Any], codec: str) -> None:
    r = results["lossy"][codec]
    assert r["errors"][0] == 0.0, "the warm-up step sends the full tensor"
    assert max(r["errors"]) < CODEC_BOUNDS[codec], r["errors"]
    assert max(r["errors"][5:]) < 2 * max(r["errors"][1:5]), f"error feedback keeps it bounded: {r['errors']}"
    assert r["grad_equal_passthrough"], "the backward pass is a plain all-to-all"


@pytest.mark.parametrize("codec", sorted(CODEC_BOUNDS))
def test_wire_bytes_match_payload_nbytes(results: dict[str, Any], codec: str) -> None:
    r = results["lossy"][codec]
    assert r["wire_per_step"][1:] == [r["expected_wire_per_step"]] * (STEPS - 1)
    assert r["wire_per_step"][1] < r["raw_per_step"]


# ---------------------------------------------------------------------------------------------
# Worker (runs under the deepspeed launcher)
# ---------------------------------------------------------------------------------------------


def _sdpa(batch_dim_idx: int) -> Callable[..., Any]:
    """Local attention over all heads it holds: ``[b, s, h, d]`` or ``[s, b, h, d]`` in and out."""
    import torch.nn.functional as F

    def attend(q: Any, k: Any, v: Any) -> Any:
        to_bhsd = (0, 2, 1, 3) if batch_dim_idx == 0 else (1, 2, 0, 3)
        back = (0, 2, 1, 3) if batch_dim_idx == 0 else (2, 0, 1, 3)
        out = F.scaled_dot_product_attention(*(t.permute(to_bhsd) for t in (q, k, v)))
        return out.permute(back)

    return attend


def _qkv(shape: tuple[int, ...], seed: int, grad: bool) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_(grad) for _ in range(3)]


def _run(attn: Any, qkv: list[Any], batch_dim_idx: int) -> tuple[Any, list[Any]]:
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    out = attn(*leaves, batch_dim_idx)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _check_exact(group: Any, rank: int) -> dict[str, Any]:
    import torch
    from compact_hooks.integrations.deepspeed import CompactDistributedAttention
    from deepspeed.sequence.layer import DistributedAttention

    import compact_hooks as ch

    found = {}
    for b in (0, 1):
        shape = (2, 4, 4, 8) if b == 0 else (4, 2, 4, 8)  # local: 4 tokens of 8, 4 heads
        qkv = _qkv(shape, 10 + rank, True)
        for gather_idx in (0, 1):
            ref_out, ref_grads = _run(DistributedAttention(_sdpa(b), group, 2, gather_idx), qkv, b)
            for name, hook in (("passthrough", ch.PassthroughHook()), ("none", ch.CompactHook({"compressor": "none"}))):
                attn = CompactDistributedAttention(_sdpa(b), group, 2, gather_idx, key="attn", hook=hook)
                out, grads = _run(attn, qkv, b)
                flags = {"out": torch.equal(out, ref_out)}
                flags.update({f"d{t}": torch.equal(g, rg) for t, g, rg in zip("qkv", grads, ref_grads)})
                found[f"{name}/b{b}/g{gather_idx}"] = flags
    return found


def _error_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _check_errors(group: Any, rank: int) -> dict[str, str]:
    import torch
    from compact_hooks.integrations.deepspeed import CompactDistributedAttention, split_sequence

    attn = CompactDistributedAttention(_sdpa(0), group, 2, 1, key="attn")
    heads3 = _qkv((1, 4, 3, 8), 1, False)
    seq_len = 4 if rank == 0 else 3  # a 7-token sequence over 2 ranks
    uneven = _qkv((1, seq_len, 2, 8), 2, False)
    return {
        "heads": _error_of(lambda: attn(*heads3, 0)),
        "seq": _error_of(lambda: CompactDistributedAttention(_sdpa(0), group, 2, 1, key="u")(*uneven, 0)),
        "split": _error_of(lambda: split_sequence(torch.zeros(1, 7, 2, 8), group, dim=1)),
    }


def _drifting(step: int, shape: tuple[int, ...], rank: int) -> list[Any]:
    """Q/K/V of a 'denoising step': a fixed field plus a slow drift and a little fresh noise."""
    base = _qkv(shape, 100 + rank, False)
    drift = _qkv(shape, 200 + rank, False)
    noise = _qkv(shape, 300 + 17 * step + rank, False)
    return [b + 0.05 * step * d + 0.01 * n for b, d, n in zip(base, drift, noise)]


def _grads_straight_through(group: Any, qkv: list[Any], hook: Any) -> bool:
    """With a linear local attention the gradient does not depend on the (lossy) activations, so the
    lossy layer's input gradients equal the exact layer's bit for bit: the backward all-to-alls are plain."""
    import torch
    from compact_hooks.integrations.deepspeed import CompactDistributedAttention

    import compact_hooks as ch

    def linear(q: Any, k: Any, v: Any) -> Any:
        return q + 2 * k - v

    grads = [_run(CompactDistributedAttention(linear, group, 2, 1, key=key, hook=h), qkv, 0)[1]
             for key, h in (("lin", hook), ("lin", ch.PassthroughHook()))]
    return all(torch.equal(g, rg) for g, rg in zip(*grads))


def _check_lossy(group: Any, rank: int, codec: str) -> dict[str, Any]:
    import torch
    from compact_hooks.integrations.deepspeed import CompactDistributedAttention

    import compact_hooks as ch

    size = torch.distributed.get_world_size(group)
    shape = (1, 16, 4, 16)
    hook = ch.CompactHook({"compressor": codec, "residual": "ef", "warmup_steps": 1, "warmup_compressor": None})
    lossy = CompactDistributedAttention(_sdpa(0), group, 2, 1, key="attn", hook=hook)
    exact = CompactDistributedAttention(_sdpa(0), group, 2, 1, key="attn", hook=ch.PassthroughHook())
    errors, wire, raw, grad_equal = [], [], [], True
    for step in range(STEPS):
        qkv = _drifting(step, shape, rank)
        before = hook.stats()["per_key"].get("attn:qkv", {"wire_bytes": 0, "raw_bytes": 0})
        out, _ = _run(lossy, qkv, 0)
        ref, _ = _run(exact, qkv, 0)
        after = hook.stats()["per_key"]["attn:qkv"]
        hook.next_step()
        err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        errors.append(err)
        wire.append(after["wire_bytes"] - before["wire_bytes"])
        raw.append(after["raw_bytes"] - before["raw_bytes"])
        grad_equal &= _grads_straight_through(group, qkv, hook)
    chunk = (1, 3, shape[0], shape[1], shape[2] // size, shape[3])  # Q, K, V stacked
    expected = (size - 1) * ch.build_compressor(codec).payload_nbytes(chunk, torch.float32)
    return {"errors": [round(e, 6) for e in errors], "max_error": max(errors), "wire_per_step": wire,
            "raw_per_step": raw[1], "expected_wire_per_step": expected, "grad_equal_passthrough": grad_equal}


def _check_keys(group: Any) -> dict[str, list[str]]:
    """The call-site keys one forward produces, in call order: same shapes, K/V with fewer heads than
    Q, and a rule for role k."""
    from compact_hooks.integrations.deepspeed import CompactDistributedAttention

    import compact_hooks as ch

    def keys(cfg: dict[str, Any], q: Any, k: Any, v: Any) -> list[str]:
        hook = ch.CompactHook(cfg)
        CompactDistributedAttention(lambda q, k, v: q, group, 2, 1, key="attn", hook=hook)(q, k, v, 0)
        return list(hook.stats()["per_key"])

    q, k, v = _qkv((1, 4, 4, 8), 0, False)
    return {"fused": keys({"compressor": "none"}, q, k, v),
            "gqa": keys({"compressor": "none"}, q, k[:, :, :2], v[:, :, :2]),
            "role_rule": keys({"compressor": "none", "rules": [{"match": {"role": "k"}, "plain": True}]}, q, k, v)}


def worker(out_path: str) -> None:
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank, group = dist.get_rank(), dist.new_group(list(range(dist.get_world_size())))
    results: dict[str, Any] = {}

    def save() -> None:
        if rank == 0:
            Path(out_path).write_text(json.dumps(results, indent=1))

    results["exact"] = _check_exact(group, rank)
    results["keys"] = _check_keys(group)
    save()
    results["errors"] = _check_errors(group, rank)
    save()
    results["lossy"] = {c: _check_lossy(group, rank, c) for c in CODEC_BOUNDS}
    results["done"] = True
    save()
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left to interpreter teardown can abort the process


if __name__ == "__main__":
    worker(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
