"""What ``compact-hooks bench e2e`` runs: its models, methods, targets and their descriptions."""

from __future__ import annotations

from typing import Any

PROGRESS = "[bench e2e] "
MODELS: dict[str, dict[str, Any]] = {
    # hidden 768 = 12 x 64, 4 double + 8 single blocks, 32x32 latent patches (1024) + 64 text tokens
    "medium": {"heads": 12, "head_dim": 64, "layers": 4, "single_layers": 8, "text_tokens": 64, "size": 128},
    # hidden 256 = 4 x 64, 2 double + 4 single blocks, 16x16 latent patches (256) + 32 text tokens: a full
    # 20+ step schedule of every method fits a few minutes at slow link rates
    "small": {"heads": 4, "head_dim": 64, "layers": 2, "single_layers": 4, "text_tokens": 32, "size": 64},
    # hidden 64 = 4 x 16, 1 + 1 blocks, 8x8 patches (64) + 8 text tokens: for tests
    "tiny": {"heads": 4, "head_dim": 16, "layers": 1, "single_layers": 1, "text_tokens": 8, "size": 32,
             "latent_channels": 4, "vae_blocks": (8, 8)},
}
DEFAULT_STEPS = 3
PROJECT_STEPS = 28  # FLUX.1-dev's default step count, for the projection from measured step times
# method -> its "compact_hooks" block ("lowrank" and "auto" stand for the bench's --lowrank / --auto-target specs)
COMPACT_METHODS: dict[str, dict[str, Any]] = {
    # a full first step, as measured before int8 became the default first step
    "compact_int2": {"compressor": "int2", "warmup_compressor": None},
    "compact_int2_warm8": {"compressor": "int2", "warmup_compressor": "int8"},
    "compact_int1": {"compressor": "int1"},
    "compact_lowrank": {"compressor": "lowrank"},
    "compact_auto": {"compressor": "auto"},
    "compact_auto_at_int2": {"compressor": {"name": "auto", "bytes_of": "int2"}},  # int2's bytes, allocated per step
    "naive_fp8": {"compressor": "fp8", "residual": "none"},  # xDiT / cache-dit FP8 comms: e4m3, per-token scales
}
DEFAULT_AUTO_TARGET = 0.02
LADDER_CODECS = {"int2": "compact_int2", "int1": "compact_int1", "lowrank": "compact_lowrank"}
LADDER_MODES = ("none", "delta", "ef", "ef2")
METHOD_ORDER = ("single", "compute_only", "ulysses", "allgather", "stale", *COMPACT_METHODS)
TARGETS = {"comm_fraction": 0.9, "compact_int2": 4.0, "compact_int2_warm8": 8.0, "compact_lowrank": 12.0,
           "x_ideal": 1.3, "overhead_pct": 2.0}
PIPELINE_NOTE = ("diffusers FluxPipeline(output_type='latent'): FlowMatchEuler scheduler, random prompt embeds, "
                 "no VAE decode; quality on the final packed latent")
def lowrank_spec(rank: int = 32, factor_bits: int = 4) -> dict[str, Any]:
    """The low-rank codec the bench uses (a fresh dict)."""
    return {"name": "lowrank", "rank": rank, "factor_bits": factor_bits}


def model_info(model: str) -> dict[str, Any]:
    """What the named model is (tokens, hidden size, blocks)."""
    m = MODELS[model]
    image_tokens = (m["size"] // 4) ** 2  # FluxPipeline: VAE factor 2, then 2x2 packing
    return {"name": model, "hidden": m["heads"] * m["head_dim"], "heads": m["heads"], "head_dim": m["head_dim"],
            "double_blocks": m["layers"], "single_blocks": m["single_layers"], "image_tokens": image_tokens,
            "text_tokens": m["text_tokens"], "tokens": image_tokens + m["text_tokens"],
            "height": m["size"], "width": m["size"], "weights": "random (seeded), float32"}
