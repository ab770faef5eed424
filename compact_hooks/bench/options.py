"""The options of the ``compact-hooks bench`` kinds whose modules import torch (codecs, drift, scaling,
quality, trace), declared here with argparse only, and the argument types they share.

Each ``add_*`` registers one kind with a :class:`~compact_hooks.cli.Handler` that imports the kind's
module when it runs, so ``compact-hooks bench --help`` and usage errors load no torch. Defaults that
depend on torch are strings that the argument's type turns into the value when the command parses
(``--dtype float16`` -> ``torch.float16``, ``--device auto`` -> ``cuda`` when available, else ``cpu``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from compact_hooks.cli import Handler, module_doc


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes comma-separated integers like 1088,3072; got {text!r}")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--shape dims must be positive; got {text!r}")
    return dims


def dtype_arg(text: str) -> Any:
    """``float32`` / ``float16`` / ``bfloat16`` -> the torch dtype."""
    if text not in ("float32", "float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"--dtype is float32, float16 or bfloat16; got {text!r}")
    import torch

    return getattr(torch, text)


def device_arg(text: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; any other device name as given."""
    if text != "auto":
        return text
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spec_arg(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("{") else text


def add_codecs(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench codecs`` (``compact_hooks.bench.codecs``)."""
    codecs = kinds.add_parser("codecs", help="wire ratio, error and speed of each codec vs a memory copy")
    codecs.add_argument("--shape", type=shape_arg, default=(1088, 3072))
    codecs.add_argument("--dtype", type=dtype_arg, default="float16")
    codecs.add_argument("--compressor", action="append", help="a name or JSON spec (repeatable); default: all")
    codecs.add_argument("--repeats", type=int, default=10)
    codecs.add_argument("--device", type=device_arg, default="auto", help="default: cuda when available, else cpu")
    codecs.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    codecs.add_argument("--json", action="store_true")
    codecs.set_defaults(handler=Handler("compact_hooks.bench.codecs:main_codecs"))


def add_drift(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench drift`` (``compact_hooks.bench.drift``)."""
    drift = kinds.add_parser("drift", help="per-step error of residual modes none, delta, ef, ef2")
    drift.add_argument("--steps", type=int, default=50)
    drift.add_argument("--compressor", default="int2", help="a name or JSON spec")
    drift.add_argument("--shape", type=shape_arg, default=(256, 512))
    drift.add_argument("--dtype", type=dtype_arg, default="float16")
    drift.add_argument("--device", type=device_arg, default="auto", help="default: cuda when available, else cpu")
    drift.add_argument("--warmup-compressor", default=None,
                       help="send the first step with this codec (name or JSON spec) instead of in full")
    drift.add_argument("--base-dtype", default="input",
                       choices=["input", "float32", "bfloat16", "float16", "int8", "fp8"],
                       help="how every stream stores its base (default: the input's dtype)")
    drift.add_argument("--json", action="store_true")
    drift.set_defaults(handler=Handler("compact_hooks.bench.drift:main_drift"))


def add_scaling(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench scaling`` (``compact_hooks.bench.scaling``)."""
    p = kinds.add_parser("scaling", help="wire bytes and session memory vs tokens, world size and layers")
    p.add_argument("--world", type=int, nargs="+", default=None, help="default 2 3 4 (--preset: 2 4 8 16)")
    p.add_argument("--preset", choices=["flux-dev-1024", "wan2.1-14b-720p-81f", "hunyuanvideo-720p-129f", "cogvideox-5b"],
                   help="base memory and wire bytes of a real workload per mode and base option (formulas, "
                        "checked at small scale)")
    p.add_argument("--mode", nargs="+", choices=["ulysses", "allgather", "ring", "usp"],
                   help="--preset: the modes (default: all)")
    p.add_argument("--check-world", type=int, default=4,
                   help="--preset: local gloo ranks of the small-scale check (0: skip it)")
    p.add_argument("--side", type=int, nargs="+", default=[16, 32], help="latent side: tokens = side^2 + 12 text")
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 6], help="transformer blocks (1/3 double)")
    p.add_argument("--compressor", default="int2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=Handler("compact_hooks.bench.scaling_report:main"))


def add_quality(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench quality`` (``compact_hooks.bench.quality``)."""
    p = kinds.add_parser("quality", help="image quality of every method on the digits model or --model DIR (2 ranks)",
                         description=module_doc("compact_hooks.bench.quality"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20; few-step samplers: 2, 4, 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--world-size", type=int, default=2, help="ranks (the 4 heads allow 1, 2 or 4)")
    p.add_argument("--methods", nargs="+", help="method names (default: all; the reference always runs)")
    p.add_argument("--out", default="out/quality", help="writes quality.png and quality.json here ('' : none)")
    p.add_argument("--weights", help="a trained digits model directory (default: the shipped weights)")
    p.add_argument("--model", help="a FluxTransformer2DModel or FluxPipeline directory of one's own instead")
    p.add_argument("--prompt-embeds", help="--model: .safetensors with prompt_embeds [N, T, D] and "
                                           "pooled_prompt_embeds [N, P] (default: --prompts random ones)")
    p.add_argument("--prompts", type=int, default=4, help="--model: random prompt embeddings to sample (default 4)")
    p.add_argument("--embed-seed", type=int, default=0, help="--model: seed of the random prompt embeddings")
    p.add_argument("--height", type=int, default=256, help="--model: image height in pixels (default 256)")
    p.add_argument("--width", type=int, default=256, help="--model: image width in pixels (default 256)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=Handler("compact_hooks.bench.quality:main_quality"))


# the residual modes `bench trace` replays by default (compact_hooks.bench.trace.MODES)
TRACE_MODES = ("ef", "delta")


def add_trace(kinds: argparse._SubParsersAction) -> None:
    """Register ``bench trace`` (``compact_hooks.bench.trace``)."""
    p = kinds.add_parser("trace", help="replay a recorded activation trace through the codecs",
                         description=module_doc("compact_hooks.bench.trace"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace directory (compact-hooks run --record-trace DIR)")
    p.add_argument("--codec", dest="codecs", action="append",
                   help="a codec name or JSON spec (repeatable; default: every registered codec)")
    p.add_argument("--modes", default=",".join(TRACE_MODES), help="residual modes, comma-separated (default: ef,delta)")
    p.add_argument("--keys", default="*", help="globs of recorded keys to replay, comma-separated (default: *)")
    p.add_argument("--warmup", type=int, default=1, help="full sends at the start of each request (default 1)")
    p.add_argument("--warmup-compressor", default="recorded",
                   help="codec (name or JSON spec) of the full sends; 'none': exact; default: the recorded run's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=Handler("compact_hooks.bench.trace:main_trace"))
