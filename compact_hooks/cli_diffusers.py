"""The parsers of ``compact-hooks run`` and ``compact-hooks train-tiny``, declared without importing diffusers.

Every module under ``compact_hooks.integrations.diffusers`` loads diffusers (the package's
``__init__`` checks it), so these parsers live here; their handlers (``job.main``, ``train_tiny.run``)
are imported when the command runs, and their descriptions are those modules' docstrings, read from
the source.
"""

from __future__ import annotations

import argparse
from typing import Any

from compact_hooks.cli import Handler, module_doc

JOB = "compact_hooks.integrations.diffusers.job"
TRAIN_TINY = "compact_hooks.integrations.diffusers.train_tiny"
# train-tiny's --out: relative to the working directory, so training never writes into the installed package
TRAIN_TINY_OUT = "out/flux-digits"
# --dtype of `run` -> the torch dtype's name
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run`` on the ``compact-hooks`` command's subparsers (handler: ``job.main``, imported when run)."""
    p = subparsers.add_parser(
        "run", help="sequence-parallel diffusers inference with compressed collectives",
        description=module_doc(JOB), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a packaged config by name (compact-hooks configs lists them, "
                        "e.g. ulysses-int2) or a JSON file with a \"compact_hooks\" block")
    p.add_argument("--model", help="trained (default: the embedded digits model), random (random-weight FLUX, "
                                    "for timing), a local diffusers pipeline directory or a FluxTransformer2DModel "
                                    "directory (config.json + weights)")
    p.add_argument("--prompt-embeds", help="torch/safetensors file of pipeline kwargs "
                                            "(prompt_embeds, pooled_prompt_embeds, ...)")
    p.add_argument("--prompt", help="text prompt (a --model with text encoders)")
    p.add_argument("--steps", type=int, help="denoising steps (trained, random and a transformer directory: 20; "
                                                 "a pipeline: its default)")
    p.add_argument("--height", type=int, help="image height in pixels (trained: 16; random: 128; a transformer "
                                                  "directory: 256; a pipeline: its default)")
    p.add_argument("--width", type=int, help="image width in pixels (trained: 16; random: 128; a transformer "
                                                 "directory: 256; a pipeline: its default)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (trained: not used; random: 3.5; "
                                                            "a pipeline: its default)")
    p.add_argument("--out", default="out", help="output directory (rank 0 writes it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--mode", choices=("ulysses", "allgather", "ring", "usp", "native"), default="ulysses",
                   help="usp: Ulysses inside each host, ring across hosts (degrees from the host layout by default); "
                        "native: diffusers' own context parallelism (enable_parallelism; transformers with a "
                        "_cp_plan), every collective routed through the hook")
    p.add_argument("--ulysses-degree", type=int, help="--mode usp/native: ranks per Ulysses group "
                                                      "(native default: all ranks)")
    p.add_argument("--ring-degree", type=int, help="--mode usp/native: Ulysses groups in the ring")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-reference", action="store_true", help="skip the uncompressed reference run")
    p.add_argument("--record-trace", metavar="DIR", help="record the hook's tensors per step to DIR")
    p.add_argument("--trace-keys", help="comma-separated key globs to record (default: the config's "
                                        "\"trace\": {\"keys\": [...]}, else all)")
    p.add_argument("--trace-steps", type=int, help="record only the first N steps")
    p.add_argument("--single-process", action="store_true",
                   help="run without a launcher on this one process (nothing is parallel; a smoke test)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=Handler(f"{JOB}:main"))
    return p


def add_train_tiny_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train-tiny`` on the command's subparsers (handler: ``train_tiny.run``, imported when run)."""
    p = sub.add_parser("train-tiny", help="train the embedded digits FLUX model (deterministic given --seed)",
                       description=module_doc(TRAIN_TINY), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=TRAIN_TINY_OUT,
                   help="output directory (default: %(default)s in the working directory; never the installed package)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-check", action="store_true", help="skip the classifier check of the samples")
    p.set_defaults(handler=Handler(f"{TRAIN_TINY}:run"), parser=p)
    return p
