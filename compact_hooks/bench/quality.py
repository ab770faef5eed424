"""``compact-hooks bench quality``: image quality of every method on the trained digits model, or on a
FLUX model directory of one's own (``--model DIR``).

On 2 ranks (separate processes, gloo), the embedded trained FLUX-architecture digits model
(:mod:`compact_hooks.integrations.diffusers.trained`) samples every asked class for each seed with
Ulysses sequence parallelism, once per method: uncompressed (the reference), DistriFusion-style stale
activations, int2 without residual (``none``), int2 residuals without error feedback (``delta``), and
CompactFusion residuals with error feedback (``ef``) for int1, int2, int2cf, int4 and lowrank (the
codec's defaults, rank 32, and rank 4 with 8-bit factors). Each method's images are compared with
the reference images of the same seeds: PSNR, SSIM
(scikit-image's ``structural_similarity``), the digits classifier's agreement with the asked class,
and the wire bytes per image summed over ranks. LPIPS is ``null``: its networks' weights are not in a
pip package (the ``lpips`` package downloads torchvision's backbone weights at run time).

``--model DIR`` takes any ``FluxTransformer2DModel`` directory (``config.json`` + weights: the images are
the final latents, see :mod:`compact_hooks.integrations.diffusers.model_dir`) or ``FluxPipeline`` directory
(loaded without text encoders; its VAE decodes the images). Its prompts are embeddings:
``--prompt-embeds FILE.safetensors`` holding ``prompt_embeds`` ``[N, T, D]`` and ``pooled_prompt_embeds``
``[N, P]``, else ``--prompts N`` random ones (standard normal, from ``--embed-seed``). Each seed samples
every prompt; ``--height`` / ``--width`` set the image size; class accuracy is ``null``.
``--steps N`` sets the denoising steps (few-step samplers: 2, 4, 8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

COLLECTIVES = ["all_gather", "all_to_all", "ring_exchange"]
LOWRANK = {"name": "lowrank"}  # the codec's defaults: rank 32, fp16 factors
LOWRANK_SMALL = {"name": "lowrank", "rank": 4, "factor_bits": 8}
# (name, hook config); every compact config has one warm-up step (warmup_steps 1), sent as int8 (the
# default warmup_compressor) unless it says otherwise
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("uncompressed", {"hook": "passthrough"}),
    ("stale", {"hook": "stale"}),
    # stale exchanges of int2 residuals with error feedback (the output all-to-all fresh: stale_fresh_roles)
    ("stale int2", {"compressor": "int2", "residual": "ef", "stale": True}),
    ("naive int2", {"compressor": "int2", "residual": "none"}),
    ("naive fp8", {"compressor": "fp8", "residual": "none"}),  # xDiT / cache-dit FP8 comms: e4m3, per-token scales
    ("delta int2", {"compressor": "int2", "residual": "delta"}),
    ("compact int1", {"compressor": "int1", "residual": "ef"}),
    ("compact int2", {"compressor": "int2", "residual": "ef"}),  # the default first step: int8
    ("compact int2 full first step", {"compressor": "int2", "residual": "ef", "warmup_compressor": None}),
    ("compact int2 base int8", {"compressor": "int2", "residual": "ef", "base_dtype": "int8"}),  # 8-bit bases
    # second-order error feedback (a velocity base) and an int4 first step: FP8's quality at 1/3.5 of its bytes
    ("compact int2 ef2", {"compressor": "int2", "residual": "ef2", "warmup_compressor": "int4"}),
    ("compact auto", {"compressor": {"name": "auto", "target_rel_error": 0.06}, "residual": "ef"}),
    # auto with a byte budget: each fixed codec's own bytes, allocated per step across call sites (issue 24)
    ("auto at int1 bytes", {"compressor": {"name": "auto", "bytes_of": "int1"}, "residual": "ef"}),
    ("auto at int2 bytes", {"compressor": {"name": "auto", "bytes_of": "int2"}, "residual": "ef"}),
    ("auto at int4 bytes", {"compressor": {"name": "auto", "bytes_of": "int4"}, "residual": "ef"}),
    ("compact int2cf", {"compressor": "int2cf", "residual": "ef"}),
    ("compact int4", {"compressor": "int4", "residual": "ef"}),
    ("compact lowrank", {"compressor": LOWRANK, "residual": "ef"}),
    ("compact lowrank r4", {"compressor": LOWRANK_SMALL, "residual": "ef"}),
]
LPIPS_NOTE = ("null: LPIPS needs pretrained AlexNet/VGG weights that no pip package ships "
              "(the lpips package fetches torchvision's at run time; this machine has no downloads)")


def method_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"enabled": True, "warmup_steps": 1, "collectives": COLLECTIVES, **cfg}


def rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run on each rank: every method's images (rank 0 keeps them) and this rank's hook byte counters."""
    import torch.distributed as dist

    import compact_hooks as ch
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.trained import load_trained_pipeline

    torch.set_num_threads(1)
    if spec.get("model"):
        from compact_hooks.integrations.diffusers.model_dir import load_model_dir

        pipe = load_model_dir(spec["model"])
        call: dict[str, Any] = {**spec["embeds"], "height": spec["height"], "width": spec["width"]}
    else:
        pipe = load_trained_pipeline(spec.get("weights"))
        call = {"prompt": [str(c) for c in spec["classes"]]}
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, Any] = {}
    for name, cfg in spec["methods"]:
        hook = ch.build_hook({"compact_hooks": method_config(cfg)})
        images = []
        start = time.perf_counter()
        with parallelize(pipe, dist.group.WORLD, mode="ulysses", hook=hook):
            for seed in spec["seeds"]:
                images.append(pipe(**call, num_inference_steps=spec["steps"], output_type="pt",
                                   generator=torch.Generator().manual_seed(seed)).images.float().cpu())
        if hasattr(hook, "drain"):
            hook.drain()  # a stale compressed hook records the last step's bytes when it decodes them
        stats = hook.stats()
        out[name] = {"images": torch.cat(images) if rank == 0 else None, "seconds": time.perf_counter() - start,
                     "raw_bytes": int(stats.get("raw_bytes", 0)), "wire_bytes": int(stats.get("wire_bytes", 0))}
    return out


def psnr_db(x: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """Mean over images of the PSNR (images in [0, 1]); ``None`` if all are identical."""
    mse = ((x.float() - ref.float()) ** 2).flatten(1).mean(1)
    if bool((mse == 0).all()):
        return None
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean())


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM (scikit-image, data range 1, 7x7 windows; smaller odd ones for smaller images) over
    ``[N, C, H, W]`` images and their channels."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bench quality needs scikit-image: pip install 'compact-hooks[quality]'") from exc
    side = min(x.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    vals = [structural_similarity(a[c].double().numpy(), b[c].double().numpy(), data_range=1.0, win_size=win)
            for a, b in zip(x, ref) for c in range(x.shape[1])]
    return float(sum(vals) / len(vals))


def evaluate(results: dict[str, Any], classes: Optional[list[int]], n_seeds: int) -> list[dict[str, Any]]:
    """``methods[]`` rows from the per-rank results (rank 0's images, every rank's bytes); ``classes``
    ``None``: no digits classifier (a model of one's own), class accuracy ``None``."""
    ref = results[0]["uncompressed"]["images"]
    n = ref.shape[0]
    accuracy = lambda images: None  # noqa: E731
    if classes is not None:
        from compact_hooks.integrations.diffusers.digits_check import classify, digits_classifier

        asked, clf = torch.tensor(classes).repeat(n_seeds), digits_classifier()
        accuracy = lambda images: float((classify(images, clf) == asked).float().mean())  # noqa: E731
    raw = max(sum(r[name]["raw_bytes"] for r in results) for name in results[0])
    rows = []
    for name in results[0]:
        images = results[0][name]["images"]
        wire = sum(r[name]["wire_bytes"] for r in results) if name != "uncompressed" else raw
        wire = wire or raw
        rows.append({
            "name": name, "psnr_db": psnr_db(images, ref), "ssim": ssim(images, ref), "lpips_or_null": None,
            "wire_bytes_per_image": wire / n, "ratio": raw / wire if wire else None,
            "class_accuracy": accuracy(images),
            "seconds": max(r[name]["seconds"] for r in results),
        })
    return rows


def save_grid(results: dict[str, Any], names: list[str], path: Path, cols: int, scale: int = 4,
              gap: int = 2, label_width: int = 120) -> None:
    """One labelled row per method (reference first): its first ``cols`` images, ``scale``x upscaled."""
    from PIL import Image, ImageDraw

    size = int(results[names[0]]["images"].shape[-1]) * scale
    rgb = int(results[names[0]]["images"].shape[1]) == 3
    canvas = Image.new("RGB" if rgb else "L", (label_width + cols * (size + gap), len(names) * (size + gap)),
                       color=(255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        y = row * (size + gap)
        draw.text((4, y + size // 2 - 5), name, fill=(0, 0, 0) if rgb else 0)
        for col, img in enumerate(results[name]["images"][:cols]):
            cell = ((img.permute(1, 2, 0) if rgb else img[0]).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(cell).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + col * (size + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def model_spec(model: str, prompt_embeds: Optional[str], prompts: int, embed_seed: int) -> dict[str, Any]:
    """``--model DIR``'s part of the rank spec: the directory and its prompt embeddings (CPU tensors)."""
    from diffusers import FluxTransformer2DModel

    from compact_hooks.integrations.diffusers.model_dir import directory_kind, random_prompt_embeds, read_prompt_embeds

    sub = "transformer" if directory_kind(model) == "pipeline" else None
    config = FluxTransformer2DModel.load_config(model, subfolder=sub, local_files_only=True)
    embeds = read_prompt_embeds(prompt_embeds, config) if prompt_embeds else random_prompt_embeds(config, prompts, embed_seed)
    return {"model": str(model), "embeds": embeds}


def run(steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2), classes: tuple[int, ...] = tuple(range(10)),
        world: int = 2, out: Optional[Path] = None, methods: Optional[list[str]] = None,
        weights: Optional[str] = None, model: Optional[str] = None, prompt_embeds: Optional[str] = None,
        prompts: int = 4, embed_seed: int = 0, height: int = 256, width: int = 256) -> dict[str, Any]:
    """Every method's images against the uncompressed ones. ``model``: a FLUX directory of one's own
    (prompt embeddings from ``prompt_embeds`` or ``prompts`` random ones) instead of the digits model."""
    from compact_hooks.launcher.local import run_ranks

    chosen = [(n, c) for n, c in METHODS if methods is None or n in methods or n == "uncompressed"]
    unknown = set(methods or ()) - {n for n, _ in METHODS}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {[n for n, _ in METHODS]}")
    spec: dict[str, Any] = {"steps": steps, "seeds": list(seeds), "classes": list(classes), "methods": chosen,
                            "weights": weights, "height": height, "width": width}
    if model is not None:
        spec.update(model_spec(model, prompt_embeds, prompts, embed_seed))
    start = time.perf_counter()
    results = run_ranks(rank_main, world, spec)
    rows = evaluate(results, None if model else list(classes), len(seeds))
    n_images = int(results[0]["uncompressed"]["images"].shape[0])
    result: dict[str, Any] = {
        "model": Path(model).name if model else "embedded-flux-digits", "weights": weights,  # --weights: its own
        "mode": "ulysses", "world_size": world,
        "steps": steps, "seeds": list(seeds), "classes": None if model else list(classes),
        "images_per_method": n_images,
        "reference": "uncompressed", "lpips": LPIPS_NOTE, "lowrank": LOWRANK, "lowrank_r4": LOWRANK_SMALL, "methods": rows,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        grid = out / "quality.png"
        save_grid(results[0], [n for n, _ in chosen], grid, cols=min(n_images, 10) if model else len(classes))
        (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
        result["grid"] = str(grid)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['model']}: {result['world_size']} ranks {result['mode']}, {result['steps']} steps, "
          f"{result['images_per_method']} images per method, vs {result['reference']}")
    print(f"{'method':<19} {'PSNR dB':>8} {'SSIM':>6} {'class acc':>9} {'bytes/img':>10} {'ratio':>7}")
    for m in result["methods"]:
        psnr = "inf" if m["psnr_db"] is None else f"{m['psnr_db']:.2f}"
        ratio = "-" if m["ratio"] is None or math.isinf(m["ratio"]) else f"{m['ratio']:.2f}x"
        acc = "-" if m["class_accuracy"] is None else f"{m['class_accuracy']:.3f}"
        print(f"{m['name']:<19} {psnr:>8} {m['ssim']:>6.4f} {acc:>9} "
              f"{m['wire_bytes_per_image']:>10.0f} {ratio:>7}")


def main_quality(args: argparse.Namespace) -> int:
    if args.model and args.weights:
        raise SystemExit("bench quality: --weights (a digits model) and --model (a model of one's own) exclude each other")
    result = run(args.steps, tuple(args.seeds), tuple(args.classes), args.world_size,
                 Path(args.out) if args.out else None, args.methods, args.weights, args.model, args.prompt_embeds,
                 args.prompts, args.embed_seed, args.height, args.width)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_table(result)
    return 0
