"""Rank program of the faults-under-load tests: start it with mpirun, one rank per emulated host.

``python fault_job.py --results DIR --requests N [--steps S] [--timeout-s T] [--seeds K] [--pace P]
[--stop-rank R --stop-at-request Q --stop-where collective|step]``

Every rank builds the same tiny FLUX transformer, makes it Ulysses sequence parallel through
``parallelize`` with a ``CompactHook`` (int2, error feedback, ``timeout_s=T``) and serves ``N``
requests of ``S`` denoising steps. Request ``i`` draws its latents from seed ``i % K``: requests
with the same seed are the same computation, so the outputs of every request served during a fault
must equal, bit for bit, those of its twin served before the fault. Each step's output is also
compared with a single-process forward of a twin model (same weights, no communication: the
uncompressed reference, untouched by any network fault).

``--stop-where``: rank ``R`` stops itself (SIGSTOP) in request ``Q``, step 1, either inside the
hook right before the compressed all_to_all of the first block's Q, K and V (``collective``), or before
the step's transformer forward (``step``); it logs ``stopping`` first. Someone else must SIGCONT it.

Each rank appends JSON lines to ``DIR/rank<r>.jsonl``, one ``write`` per line, so a reader sees
progress even when the job dies:

* ``{"event": "ready", "rank", "pid", "host"}`` once the model is built;
* ``{"event": "request", "rank", "request", "seed", "err", "digest", "seconds", "t"}`` per completed
  request (``err``: the largest relative L2 error of a step's output against the reference;
  ``digest``: sha256 of every step's output bytes);
* ``{"event": "stopping", "rank", "request", "where", "t"}`` right before a self-stop;
* ``{"event": "failed", "rank", "request", "error", "message", "t", "waited"}`` when an error ends
  the job (the test expects a compact-hooks ``CollectiveTimeoutError``; ``waited``: seconds since
  the request began); the error is re-raised, so the rank exits non-zero with its traceback.

The process group's own timeout is 600 s, as in a real job: only ``timeout_s`` may bound a wait.
``kill -USR1 <pid>`` prints where a rank is (faulthandler).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import compact_hooks as ch

PG_TIMEOUT_S = 600.0
STOP_KEY = "transformer_blocks.0.attn:qkv"  # the first block's Q, K and V: one compressed all_to_all


class Log:
    """Append-only JSON lines of one rank."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.fd = os.open(folder / f"rank{rank}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rank = rank

    def write(self, event: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"event": event, "rank": self.rank, **fields}) + "\n").encode())


class StopAt(ch.WrappingHook):
    """Delegates to ``inner``; SIGSTOPs this process right before the call whose key is ``key`` in
    request ``request``, step ``step`` (counted by the step/request marks of the integration)."""

    def __init__(self, inner: ch.CommHook, log: Log, request: int, step: int, key: str) -> None:
        super().__init__(inner)
        self.log, self.target, self.key = log, (request, step), key
        self.request, self.step = -1, 0
        self.stopped, self.keys = False, set()  # keys seen in the target step: why a stop never came

    def __call__(self, call: ch.CollectiveCall) -> torch.Tensor:
        if (self.request, self.step) == self.target:
            self.keys.add(call.key)
            if call.key == self.key:
                self.stopped = True
                stop_self(self.log, self.request, "collective")
        return self.inner(call)

    def check_stopped(self) -> None:
        """Raises if the target step passed without a call at ``key`` (the integration renamed it)."""
        if not self.stopped and self.request >= self.target[0]:
            raise RuntimeError(f"no call at {self.key!r} in request {self.target[0]} step {self.target[1]}: "
                               f"nothing stopped this rank; keys called there: {sorted(self.keys)}")

    def begin_request(self) -> None:
        self.request, self.step = self.request + 1, 0
        self.inner.begin_request()

    def next_step(self) -> None:
        self.step += 1
        self.inner.next_step()


def stop_self(log: Log, request: int, where: str) -> None:
    log.write("stopping", request=request, where=where, t=time.time())
    os.kill(os.getpid(), signal.SIGSTOP)


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def request_steps(model: torch.nn.Module, request: int, steps: int, size: int) -> list[dict[str, Any]]:
    """The forward kwargs of each step of request ``request`` (the timestep falls: one request)."""
    from compact_hooks.integrations.diffusers.tiny import tiny_inputs

    kwargs = tiny_inputs("flux", model, batch=1, height=size, width=size, text=8, seed=request)
    noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(10_000 + request))
    base = kwargs["hidden_states"]
    out = []
    for t in range(steps):
        out.append({**kwargs, "hidden_states": base + 0.05 * t * noise,
                    "timestep": torch.full_like(kwargs["timestep"], 1.0 - t / steps)})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds of idle time after each request")
    parser.add_argument("--size", type=int, default=8, help="latent height and width (tokens = size**2)")
    parser.add_argument("--seeds", type=int, default=10, help="request i uses seed i %% seeds")
    parser.add_argument("--stop-rank", type=int, default=1)
    parser.add_argument("--stop-at-request", type=int, default=-1)
    parser.add_argument("--stop-where", choices=("collective", "step"), default="collective")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import tiny_flux
    from compact_hooks.launcher.mpi import init_distributed

    init_distributed(backend="gloo", timeout_s=PG_TIMEOUT_S)
    faulthandler.register(signal.SIGUSR1)  # where a rank waits: kill -USR1 <pid> (after MPI's handlers)
    rank = dist.get_rank()
    log = Log(args.results, rank)
    reference, model = tiny_flux(), tiny_flux()  # same seed: the same weights
    hook: ch.CommHook = ch.CompactHook({"compressor": "int2", "residual": "ef", "timeout_s": args.timeout_s})
    stopper = rank == args.stop_rank and args.stop_at_request >= 0
    if stopper and args.stop_where == "collective":
        hook = StopAt(hook, log, args.stop_at_request, 1, STOP_KEY)
    handle = parallelize(model, None, "ulysses", hook)
    log.write("ready", pid=os.getpid(), host=socket.gethostname())
    request = -1
    started = time.monotonic()
    try:
        for request in range(args.requests):
            seed = request % args.seeds
            steps = request_steps(reference, seed, args.steps, args.size)
            with torch.no_grad():
                refs = [reference(**kw)[0] for kw in steps]
            started = time.monotonic()
            outs = []
            with torch.no_grad():
                for step, kw in enumerate(steps):
                    if stopper and args.stop_where == "step" and (request, step) == (args.stop_at_request, 1):
                        stop_self(log, request, "step")
                    outs.append(handle.model(**kw)[0])
            if isinstance(hook, StopAt):
                hook.check_stopped()
            seconds = time.monotonic() - started
            digest = hashlib.sha256(b"".join(o.contiguous().numpy().tobytes() for o in outs)).hexdigest()
            err = max(rel_l2(o, r) for o, r in zip(outs, refs))
            log.write("request", request=request, seed=seed, err=err, digest=digest, seconds=round(seconds, 4),
                      t=time.time())
            if args.pace:
                time.sleep(args.pace)
    except Exception as exc:  # noqa: BLE001 - logged for the test, then re-raised
        log.write("failed", request=request, error=type(exc).__name__, message=str(exc)[:2000], t=time.time(),
                  waited=round(time.monotonic() - started, 3))
        raise
    handle.remove()
    log.write("done", requests=args.requests, stats_requests=hook.stats().get("requests"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
