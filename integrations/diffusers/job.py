"""``compact-hooks run``: sequence-parallel diffusers inference with a compact-hooks CommHook.

Launched on N ranks by ``torchrun --nproc-per-node N``, ``deepspeed --num_gpus N``, ``mpirun -np N`` or
``srun -n N`` (ranks found by ``compact_hooks.init_distributed``); started without a launcher it refuses
and prints those command lines, unless ``--single-process`` (one rank, nothing parallel)::

    torchrun --nproc-per-node 2 -m compact_hooks.integrations.diffusers.job --config ulysses-int2 --out out
    mpirun -np 2 compact-hooks run --config ulysses-int2 --out out

Without ``--model`` (or with ``--model trained``) it loads the embedded trained FLUX-architecture digits
model (``trained``: the prompt is class labels, default ``"0 1 ... 9"``, one image each; rank 0 also writes
``grid.png``); ``--model random`` builds a random-weight FLUX pipeline (for timing; no downloads).
``--model DIR`` takes a local diffusers pipeline directory, or a transformer-only directory (``config.json``
+ weights of a ``FluxTransformer2DModel``): the pipeline is built around it (default scheduler, no text
encoders or VAE; prompt embeddings from ``--prompt-embeds`` or random ones from seed 0; the images are
its latents, see ``compact_hooks.integrations.diffusers.model_dir``; default 256x256, 20 steps).
``--record-trace DIR`` saves each step's tensor of the keys matching ``--trace-keys`` (or the config's
top-level ``"trace": {"keys": [...]}``) as the hook sees it, for ``compact-hooks bench trace DIR``.
Every rank runs the same pipeline call; the transformer is sequence-parallel
(``parallelize``) with the config's hook; ``--mode native`` uses diffusers' own context parallelism
instead (``enable_parallelism``, any transformer with a ``_cp_plan``; ``--ulysses-degree`` /
``--ring-degree``, default Ulysses over all ranks) with every collective routed through the hook.
Unless ``--no-reference``, the same call is first run with
a :class:`PassthroughHook` (exact parallel output) and the compressed image is compared with it.
Rank 0 writes ``image.png`` (``reference.png``) and ``stats.json`` to ``--out``.
Also runnable as ``python -m compact_hooks.integrations.diffusers.job ARGS``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from compact_hooks.cli_diffusers import DTYPES, add_run_parser

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "SLURM_PROCID")
EMBEDDED_DEFAULTS = {"steps": 20, "height": 128, "width": 128, "guidance_scale": 3.5}
TRAINED_DEFAULTS = {"steps": 20, "height": 16, "width": 16}
TRAINED_PROMPT = "0 1 2 3 4 5 6 7 8 9"


def usp_degrees(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ulysses_degree`` / ``ring_degree`` keywords of ``parallelize`` for ``--mode usp``
    (``--mode native`` reads them in ``native_job.enable_native``)."""
    if args.mode != "usp":
        if args.mode != "native" and (args.ulysses_degree is not None or args.ring_degree is not None):
            raise SystemExit("compact-hooks run: --ulysses-degree / --ring-degree need --mode usp or native")
        return {}
    return {"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run`` (its flags: ``compact_hooks.cli_diffusers.add_run_parser``) with this module's ``main``."""
    p = add_run_parser(subparsers)
    p.set_defaults(handler=main)
    return p


# ---- setup -------------------------------------------------------------------------------------


NOT_LAUNCHED = """compact-hooks run: this process was started without a launcher, so nothing would run in parallel
(one rank: no collective to compress, 0 bytes on the wire). Start one process per rank, e.g. on 2 ranks:

    torchrun --nproc-per-node 2 -m compact_hooks.integrations.diffusers.job {args}
    deepspeed --num_gpus 2 --module compact_hooks.integrations.diffusers.job {args}
    mpirun -np 2 compact-hooks run {args}
    srun -n 2 compact-hooks run {args}

(or `compact-hooks launch`, docs/multinode.md). To run the pipeline on this one process anyway
(a smoke test of the config and model), add --single-process."""


def init_distributed(args: argparse.Namespace) -> tuple[int, int, int, bool]:
    """``(rank, world_size, local_rank, initialised_here)`` from :func:`compact_hooks.init_distributed`
    (torchrun, deepspeed, mpirun, Slurm); an already initialised torch.distributed is used as it is.
    Without a launcher: ``SystemExit`` saying how to launch, unless ``--single-process``."""
    import torch.distributed as dist

    import compact_hooks as ch

    owned = False
    if not dist.is_initialized():
        if not any(v in os.environ for v in LAUNCHER_VARS):
            if not getattr(args, "single_process", False):
                shown = " ".join(a for a in sys.argv[1:] if a != "run") or f"--config {args.config}"
                raise SystemExit(NOT_LAUNCHED.format(args=shown))
            return 0, 1, 0, False
        owned = True
        ch.init_distributed()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local, owned


def block_note(path: str) -> Optional[str]:
    """What the job says when the config file has no ``"compact_hooks"`` block (its top level is then
    read as the block, and every key it does not set takes its default)."""
    from compact_hooks.config import BLOCK, read_json

    data = read_json(path)
    if BLOCK in data:
        return None
    unset = "every key" if not data else f"the keys it does not set ({len(data)} set)"
    return (f"compact-hooks run: {path} has no \"{BLOCK}\" block: its top level is read as the block, with "
            f"the defaults (docs/configuration.md) for {unset}")


def load_prompt_kwargs(path: str, device: Any, dtype: Any) -> dict[str, Any]:
    """Pipeline kwargs (tensors) from a ``.safetensors`` file or a ``torch.save``'d dict."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        data = {"prompt_embeds": data}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"--prompt-embeds {path}: expected a dict of tensors such as "
                         f"{{'prompt_embeds': ..., 'pooled_prompt_embeds': ...}}")
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in data.items()}


def transformer_only(model: str) -> bool:
    """Whether ``--model`` is a FluxTransformer2DModel directory (config.json + weights)."""
    from compact_hooks.integrations.diffusers.model_dir import directory_kind

    return directory_kind(model) == "transformer"


def build_pipeline(args: argparse.Namespace, device: Any, dtype: Any) -> tuple[Any, dict[str, Any], str]:
    """``(pipeline, prompt kwargs, model name)``."""
    from compact_hooks.integrations.diffusers.tiny import default_flux_pipeline, default_prompt_embeds

    if args.model in (None, "trained"):
        from compact_hooks.integrations.diffusers.trained import load_trained_pipeline

        pipe = load_trained_pipeline(dtype=dtype, device=device)
        return pipe, {"prompt": args.prompt or TRAINED_PROMPT}, "embedded-flux-digits"
    if args.model != "random":
        from compact_hooks.integrations.diffusers import model_dir
        from diffusers import DiffusionPipeline

        name = Path(args.model).name
        if model_dir.directory_kind(args.model) == "transformer":  # config.json + weights: no text encoders
            pipe = model_dir.load_model_dir(args.model, dtype=dtype, device=device)
            embeds = model_dir.read_prompt_embeds(args.prompt_embeds, pipe.transformer) if args.prompt_embeds \
                else model_dir.random_prompt_embeds(pipe.transformer, n=1, seed=0)
            return pipe, {k: v.to(device=device, dtype=dtype) for k, v in embeds.items()}, name
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(device)
        if args.prompt_embeds:
            prompt = load_prompt_kwargs(args.prompt_embeds, device, dtype)
        else:
            prompt = {"prompt": args.prompt or "a photograph of a lighthouse on a cliff at sunset"}
        return pipe, prompt, name
    pipe = default_flux_pipeline(seed=0, dtype=dtype).to(device)
    if args.prompt_embeds:
        prompt = load_prompt_kwargs(args.prompt_embeds, device, dtype)
    else:
        prompt = {k: v.to(device) for k, v in default_prompt_embeds(pipe, seed=0).items()}
    return pipe, prompt, "embedded-random-flux"


# ---- one generation ----------------------------------------------------------------------------


def _as_images(out: Any) -> Any:
    """The pipeline output as a float ``[N, C, H, W]`` tensor in [0, 1] (video frames flattened)."""
    import numpy as np
    import torch

    images = out.images if hasattr(out, "images") else out.frames
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(np.asarray(x)) for x in images])
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dim() == 5:  # video: [B, F, C, H, W]
        images = images.flatten(0, 1)
    if images.dim() == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.permute(0, 3, 1, 2)  # numpy layout [N, H, W, C]
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float().cpu()


def generate(pipe: Any, prompt: dict[str, Any], args: argparse.Namespace, device: Any, desc: str,
             show: bool) -> tuple[Any, list[Any], float]:
    """Run the pipeline once: ``(images [N, C, H, W] in [0, 1], latents after each step, seconds)``."""
    import torch
    import torch.distributed as dist

    latents: list[Any] = []
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {**prompt, "num_inference_steps": args.steps, "output_type": "pt",
                              "generator": torch.Generator(device="cpu").manual_seed(args.seed)}
    for name in ("height", "width", "guidance_scale"):
        if getattr(args, name) is not None and name in params:
            kwargs[name] = getattr(args, name)
    if "callback_on_step_end" in params:
        def on_step_end(pipe_: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            latents.append(kw["latents"].detach().float().cpu())
            return kw

        kwargs["callback_on_step_end"] = on_step_end
    elif "callback" in params and "callback_steps" in params:  # older pipelines (PixArt)
        kwargs["callback"] = lambda i, t, lat: latents.append(lat.detach().float().cpu())
        kwargs["callback_steps"] = 1

    pipe.set_progress_bar_config(disable=not show, desc=desc, leave=True)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    return _as_images(out), latents, time.perf_counter() - start


# ---- quality and stats -------------------------------------------------------------------------


def psnr_db(x: Any, ref: Any) -> Optional[float]:
    """PSNR of images in [0, 1]; ``None`` when they are identical (infinite PSNR, not valid JSON)."""
    mse = float(((x - ref) ** 2).mean())
    return None if mse == 0 else 10.0 * math.log10(1.0 / mse)


def rel_l2(x: Any, ref: Any) -> float:
    import torch

    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def gather_stats(stats: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's hook stats (each counts the bytes that rank sends)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [stats]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, stats)
    return every


def layer_of(key: str) -> str:
    return key.rsplit(":", 1)[0]


def summarize(all_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, per-layer and per-step bytes summed over ranks; errors averaged."""
    raw = sum(int(s.get("raw_bytes", 0)) for s in all_stats)
    wire = sum(int(s.get("wire_bytes", 0)) for s in all_stats)
    layers: dict[str, dict[str, Any]] = {}
    for s in all_stats:
        for key, ks in (s.get("per_key") or {}).items():
            entry = layers.setdefault(layer_of(key), {"layer": layer_of(key), "raw_bytes": 0, "wire_bytes": 0,
                                                      "calls": 0, "full_sends": 0, "plain_calls": 0,
                                                      "_err": []})
            entry["raw_bytes"] += int(ks.get("raw_bytes", 0))
            entry["wire_bytes"] += int(ks.get("wire_bytes", 0))
            entry["calls"] += int(ks.get("calls", 0))
            entry["full_sends"] += int(ks.get("full_sends", 0))  # compressed calls sent in full
            entry["plain_calls"] += int(ks.get("plain_calls", 0))  # calls that took the plain collective
            if ks.get("rel_error") is not None:
                entry["_err"].append(float(ks["rel_error"]))
    per_layer = []
    for entry in layers.values():
        errs = entry.pop("_err")
        entry["compression_ratio"] = entry["raw_bytes"] / entry["wire_bytes"] if entry["wire_bytes"] else None
        entry["rel_error"] = sum(errs) / len(errs) if errs else None
        per_layer.append(entry)
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    for s in all_stats:
        for st in s.get("per_step") or []:
            k = (int(st.get("request", 0)), int(st.get("step", 0)))
            e = steps.setdefault(k, {"request": k[0], "step": k[1], "raw_bytes": 0, "wire_bytes": 0})
            e["raw_bytes"] += int(st.get("raw_bytes", 0))
            e["wire_bytes"] += int(st.get("wire_bytes", 0))
    per_step = [steps[k] for k in sorted(steps)]
    for e in per_step:
        e["compression_ratio"] = e["raw_bytes"] / e["wire_bytes"] if e["wire_bytes"] else None
    return {"raw_bytes": raw, "wire_bytes": wire, "compression_ratio": raw / wire if wire else None,
            "per_layer": per_layer, "per_step": per_step}


def compressor_name(cfg: Any) -> str:
    if not cfg.enabled or cfg.hook == "passthrough":
        return "none"
    if cfg.hook == "cast":
        return f"cast:{cfg.cast_dtype}"
    if cfg.hook == "stale":
        return "stale"
    c = cfg.compressor
    return c if isinstance(c, str) else str(c.get("name", c))


def save_png(image: Any, path: Path) -> None:
    """Save a ``[C, H, W]`` image in [0, 1] as PNG."""
    import torch
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


def print_table(result: dict[str, Any]) -> None:
    q = result.get("quality") or {}
    rows = [
        ("model", result["model"]), ("mode", f"{result['mode']} x {result['world_size']} ranks"),
        ("compressor", result["compressor"]), ("steps", result["steps"]),
        ("raw MB", f"{result['raw_bytes'] / 1e6:.2f}"), ("wire MB", f"{result['wire_bytes'] / 1e6:.2f}"),
        ("compression", "-" if result["compression_ratio"] is None else f"{result['compression_ratio']:.2f}x"),
        ("PSNR dB", "-" if q.get("psnr_db") is None else f"{q['psnr_db']:.2f}"),
        ("rel L2", "-" if q.get("rel_l2") is None else f"{q['rel_l2']:.2e}"),
        ("latency s", f"{result['latency_s']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 24))


# ---- main --------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from compact_hooks.integrations.diffusers.native_job import enable_native, native_session, parallel

    import compact_hooks as ch
    from compact_hooks.stats import write_json

    cfg = ch.load_config(args.config)
    note = block_note(args.config)
    rank, world, local_rank, owned = init_distributed(args)
    session = contextlib.ExitStack()
    try:
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
            else torch.device("cpu")
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        defaults = {None: TRAINED_DEFAULTS, "trained": TRAINED_DEFAULTS, "random": EMBEDDED_DEFAULTS}
        if args.model not in defaults and transformer_only(args.model):
            from compact_hooks.integrations.diffusers.model_dir import DEFAULTS as MODEL_DIR_DEFAULTS

            defaults[args.model] = MODEL_DIR_DEFAULTS
        if args.model in defaults:
            for name, value in defaults[args.model].items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
        session.enter_context(native_session(args.mode, device.type))
        pipe, prompt, model_name = build_pipeline(args, device, dtype)
        native = enable_native(pipe, args.ulysses_degree, args.ring_degree, world) if args.mode == "native" else None
        if args.steps is None:
            default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
            args.steps = default.default if default is not None and isinstance(default.default, int) else 28
        group = dist.group.WORLD if dist.is_initialized() else None
        show = rank == 0
        if show and note:
            print(note, file=sys.stderr, flush=True)

        reference = ref_latents = None
        ref_seconds = None
        if not args.no_reference:
            with parallel(pipe, group, args.mode, ch.PassthroughHook(), usp_degrees(args)):
                reference, ref_latents, ref_seconds = generate(pipe, prompt, args, device, "reference", show)

        hook = ch.build_hook(cfg)
        if args.record_trace:
            from compact_hooks.bench.trace_io import TraceRecorder, finish, trace_patterns

            hook = TraceRecorder(hook, args.record_trace, trace_patterns(args.trace_keys, args.config), rank,
                                 args.trace_steps)
        with parallel(pipe, group, args.mode, hook, usp_degrees(args)) as handle:
            images, latents, seconds = generate(pipe, prompt, args, device, compressor_name(cfg), show)
        # native mode: collectives that took torch.distributed unchanged (parallelize makes its own: none)
        unrouted = handle.stats()["unrouted"] if args.mode == "native" else 0
        if args.record_trace:
            finish(hook, group, model=model_name, mode=args.mode, world_size=world, config=cfg.model_dump(mode="json"))
        every = gather_stats({**hook.stats(), "hostname": socket.gethostname(), "unrouted": unrouted}, world)
        summary = summarize(every)

        if rank == 0:
            quality: dict[str, Any] = {"psnr_db": None, "rel_l2": None}
            per_step_error: list[Optional[float]] = [None] * len(latents)
            if reference is not None:
                quality = {"psnr_db": psnr_db(images, reference), "rel_l2": rel_l2(images, reference),
                           "identical": bool(torch.equal(images, reference)),
                           "latent_rel_l2": rel_l2(latents[-1], ref_latents[-1]) if latents else None}
                per_step_error = [rel_l2(a, b) for a, b in zip(latents, ref_latents)]
            per_step = summary["per_step"]  # one request: entry i is step i
            for i, entry in enumerate(per_step):
                entry["latent_rel_l2"] = per_step_error[i] if i < len(per_step_error) else None
            result = {
                "model": model_name, "mode": args.mode, "world_size": world, "compressor": compressor_name(cfg),
                **({"ulysses_degree": native[0], "ring_degree": native[1]} if native else {}),
                "hostnames": [s["hostname"] for s in every],
                "hook": cfg.hook if cfg.enabled else "passthrough", "steps": args.steps,
                "height": int(images.shape[-2]), "width": int(images.shape[-1]), "seed": args.seed,
                "dtype": str(dtype).split(".")[-1],
                "device": device.type, "raw_bytes": summary["raw_bytes"], "wire_bytes": summary["wire_bytes"],
                "compression_ratio": summary["compression_ratio"], "unrouted": sum(s["unrouted"] for s in every),
                "latency_s": seconds,
                "reference_latency_s": ref_seconds, "quality": quality,
                "per_layer": summary["per_layer"], "per_step": per_step,
                "config": cfg.model_dump(mode="json"),
            }
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                save_png(img, out / ("image.png" if len(images) == 1 else f"image_{i:03d}.png"))
            if reference is not None:
                for i, img in enumerate(reference):
                    save_png(img, out / ("reference.png" if len(reference) == 1 else f"reference_{i:03d}.png"))
            if model_name == "embedded-flux-digits":
                from compact_hooks.integrations.diffusers.trained import image_grid

                save_png(image_grid(images, len(images), 8), out / "grid.png")
                if reference is not None:
                    save_png(image_grid(reference, len(reference), 8), out / "reference_grid.png")
            write_json(result, out / "stats.json")
            print_table(result)
            print(f"wrote {out / 'stats.json'} and {len(images)} image(s) to {out}/")
    finally:
        session.close()
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from compact_hooks.cli import run_one

    sys.exit(run_one("run", add_parser))
