"""Train the embedded digits model: flow matching of a small ``FluxTransformer2DModel`` on CPU.

    python -m compact_hooks.integrations.diffusers.train_tiny [--out DIR] [--steps 1600] [--seed 0]

(default ``--out``: ``out/flux-digits`` in the working directory; the shipped model in the package's
``weights/flux-digits`` came from this command with ``--out`` pointing there; ``load_trained_pipeline(DIR)``
loads a trained directory). 1600 steps of batch 64 take about 10-12 minutes on one free CPU core.

Flow matching as ``FlowMatchEulerDiscreteScheduler`` samples it: ``x_t = (1 - t) x0 + t noise`` with
``t`` in [0, 1] given as the transformer's ``timestep`` (``FluxPipeline`` passes ``sigma``), and the
model predicts the velocity ``noise - x0`` (the Euler step is ``x += (t_next - t) * v``). Weights
(an EMA of the training weights) are saved as fp16 safetensors with ``save_pretrained`` plus the class
embeddings. Deterministic for a seed and thread count; prints the loss curve and, at the end, how many
20-step samples a digits classifier recognises (:mod:`.digits_check`). One thread by default: on a
shared machine two OpenMP threads were up to 10x slower than one (each waits for the other's core).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from compact_hooks.cli_diffusers import TRAIN_TINY_OUT, add_train_tiny_parser

from .trained import (
    EMBEDDINGS_FILE,
    IMAGE_SIZE,
    class_embeddings,
    digits_images,
    image_ids,
    pack,
    random_transformer,
)

# relative to the working directory: training never writes into the installed package by default
DEFAULT_OUT = TRAIN_TINY_OUT


def train(out: Path, steps: int = 1600, batch: int = 64, lr: float = 1e-3, seed: int = 0, threads: int = 1,
          ema_decay: float = 0.999, log_every: int = 100) -> dict[str, Any]:
    """Train and save to ``out``; returns ``{"losses": [...], "seconds": ..., "final_loss": ...}``."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x0_all, labels_all = digits_images(IMAGE_SIZE)
    emb = class_embeddings(seed)
    model = random_transformer(seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    ids = image_ids(IMAGE_SIZE, IMAGE_SIZE)
    txt_ids = torch.zeros(emb["prompt_embeds"].shape[1], 3)
    losses: list[float] = []
    running = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0 = pack(x0_all[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(batch, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = model(hidden_states=xt, timestep=t, encoder_hidden_states=emb["prompt_embeds"][labels_all[idx]],
                     pooled_projections=emb["pooled_prompt_embeds"][labels_all[idx]], img_ids=ids, txt_ids=txt_ids,
                     return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            losses.append(running / n)
            running = 0.0
            print(f"step {step:5d}  loss {losses[-1]:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    ema.to(torch.float16).save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in emb.items()}, str(out / EMBEDDINGS_FILE))
    print(f"trained {steps} steps in {seconds:.0f}s; final loss {losses[-1]:.4f}; wrote {out}")
    return {"losses": losses, "seconds": seconds, "final_loss": losses[-1]}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-tiny`` (its flags: ``compact_hooks.cli_diffusers.add_train_tiny_parser``) with this
    module's ``run``."""
    p = add_train_tiny_parser(sub)
    p.set_defaults(handler=run)
    return p


def run(a: argparse.Namespace) -> int:
    if a.steps < 1 or a.batch < 1:
        a.parser.error("--steps and --batch must be positive")
    train(Path(a.out), a.steps, a.batch, a.lr, a.seed, a.threads)
    if not a.no_check:
        from .digits_check import sample_accuracy
        from .trained import load_trained_pipeline

        acc = sample_accuracy(load_trained_pipeline(a.out), steps=20)[0]
        print(f"classifier accuracy of 20-step samples (4 per class): {acc:.3f} (chance 0.100)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m compact_hooks.integrations.diffusers.train_tiny ARGS`` = ``compact-hooks train-tiny ARGS``."""
    from compact_hooks.cli import run_one

    return run_one("train-tiny", add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
