"""xfuser 0.7's USP through compress_xfuser on real devices: the rank program of xfuser_check.sh.

Run under torchrun (``--nproc-per-node P``): Ulysses ``--ulysses`` x ring ``--ring`` over the ``P``
ranks, a 2-block attention model (``[B, H, S, D]`` per rank, ``--dtype``) for ``--steps`` slowly
changing inputs, first unrouted, then through PassthroughHook (must be bit-identical), int8 and int2
with error feedback (worst step's relative L2 error and the compression ratio). Rank 0 prints one
JSON line per hook. On CUDA it uses NCCL and xfuser as installed; ``--device cpu`` (gloo) needs the
CPU import step of :func:`import_usp` (the one ``tests/funcol_workers.py`` needs too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def import_usp(device: str = "cpu") -> Any:
    """xfuser 0.7's usp module; for ``device="cpu"`` imported so that it runs on gloo (also used by
    ``tests/funcol_workers.py``).

    xfuser raises NotImplementedError at import without an accelerator (``envs.get_device_version``,
    read by ``xfuser.config.config``): the import runs while ``torch.backends.mps.is_available``
    reports True (the version is then None), and the real function is put back right after.
    xfuser's yunchang check (``check_long_ctx_attn``) is False without CUDA, which makes
    ``initialize_model_parallel`` skip yunchang's Ulysses / ring groups: every xfuser module's copy of
    ``HAS_LONG_CTX_ATTN`` is set True (yunchang 0.6.4 imports on CPU).
    """
    if device == "cuda":
        return importlib.import_module("xfuser.model_executor.layers.usp")
    real = torch.backends.mps.is_available
    torch.backends.mps.is_available = lambda: True
    try:
        usp = importlib.import_module("xfuser.model_executor.layers.usp")
    finally:
        torch.backends.mps.is_available = real
    for name, module in list(sys.modules.items()):
        if name.startswith("xfuser.") and hasattr(module, "HAS_LONG_CTX_ATTN"):
            module.HAS_LONG_CTX_ATTN = True
    return usp


def setup_xfuser(usp: Any, ulysses: int, ring: int, backend: str = "gloo") -> None:
    """xfuser's distributed environment, process groups (Ulysses ``ulysses`` x ring ``ring`` over every
    rank) and runtime state (SDPA_FLASH: the ring needs the LSE)."""
    import yunchang.globals as yg
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import parallel_state as ps
    from xfuser.core.distributed import runtime_state as rs

    ps.init_distributed_environment(backend=backend)
    ps.initialize_model_parallel(sequence_parallel_degree=dist.get_world_size(), ulysses_degree=ulysses, ring_degree=ring,
                                 backend=backend)
    config, _ = xFuserArgs(model="unused", ulysses_degree=ulysses, ring_degree=ring,
                           attention_backend="SDPA_FLASH").create_config()
    state = rs.ExternalRuntimeState.__new__(rs.ExternalRuntimeState)  # its __init__ ignores the degrees
    rs.RuntimeState.__init__(state, config)
    rs._RUNTIME = state
    usp.PROCESS_GROUP = yg.PROCESS_GROUP  # usp binds yunchang's groups only when CUDA is available


class Attention(nn.Module):
    def __init__(self, usp: Any, heads: int, dim: int) -> None:
        super().__init__()
        self.usp, self.heads, self.dim = usp, heads, dim
        self.qkv, self.proj = nn.Linear(heads * dim, 3 * heads * dim), nn.Linear(heads * dim, heads * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        return x + self.proj(self.usp.USP(q, k, v).transpose(1, 2).reshape(b, s, c))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=4096, help="sequence length over all ranks")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args(argv)
    usp = import_usp(a.device)
    import compact_hooks as ch
    from compact_hooks.integrations.xfuser import compress_xfuser

    setup_xfuser(usp, a.ulysses, a.ring, "nccl" if a.device == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if a.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    net = nn.Sequential(*[Attention(usp, a.heads, a.dim) for _ in range(2)]).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    shard = a.tokens // world
    base, drift = (torch.randn(1, a.tokens, a.heads * a.dim, generator=g) for _ in range(2))
    xs = [(base + 0.05 * s * drift)[:, rank * shard:(rank + 1) * shard].to(device, dtype) for s in range(a.steps)]
    ctx = importlib.import_module("compact_hooks.integrations.yunchang").cpu_flash_attention() \
        if a.device == "cpu" else contextlib.nullcontext()
    with ctx, torch.no_grad():
        plain = [net(x) for x in xs]
        for name, cfg in (("passthrough", None), ("int8", {"compressor": "int8", "residual": "ef"}),
                          ("int2", {"compressor": "int2", "residual": "ef"})):
            hook = ch.PassthroughHook() if cfg is None else ch.build_hook(cfg)
            outs = []
            with compress_xfuser(hook, net, attention=(Attention,), usp=usp) as handle:
                for x in xs:
                    outs.append(net(x))
                    hook.next_step()
                st = handle.stats()
            errs = [float((o.double() - r.double()).norm() / r.double().norm()) for o, r in zip(outs, plain)]
            row = {"hook": name, "ulysses": a.ulysses, "ring": a.ring, "device": str(device), "dtype": a.dtype,
                   "equal": all(torch.equal(o, r) for o, r in zip(outs, plain)), "max_err": max(errs),
                   "ratio": st.get("compression_ratio"), "routed": st["routed"], "unrouted": st["unrouted"],
                   "exact": st["exact"], "keys": sorted(st.get("per_key", {}))}
            if rank == 0:
                print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
