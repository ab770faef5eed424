"""Rank functions of the diffusers tests (run by ``tests.distributed.run_ranks``; importable in children).

Each worker runs many checks in one process group and returns plain numbers; the tests assert.
"""

from __future__ import annotations

from typing import Any

import torch

# A tiny FLUX pipeline for the int2 / stale / request checks (64x64 px: 256 image tokens).
TINY_PIPE = dict(heads=4, head_dim=32, layers=1, single_layers=1, latent_channels=4, vae_blocks=(8, 8))
PIPE_STEPS = 5


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def parity_worker(rank: int, world: int, cases: list[tuple[str, str, dict, dict]], modes: list[str]) -> dict:
    """Parallel (PassthroughHook) vs. single-process output of tiny models, per case and mode."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import attention_processors, parallelize
    from compact_hooks.integrations.diffusers.processors import ParallelProcessor
    from compact_hooks.integrations.diffusers.tiny import TINY_MODELS, tiny_inputs

    out: dict[str, Any] = {}
    for tag, family, model_kw, input_kw in cases:
        model = TINY_MODELS[family](**model_kw)
        inp = tiny_inputs(family, model, **input_kw)
        with torch.no_grad():
            ref = model(**inp)[0]
        stock = {k: type(p) for k, p in attention_processors(model).items()}
        for mode in modes:
            if mode == "ulysses" and model.config.num_attention_heads % world:
                continue
            handle = parallelize(model, None, mode=mode)
            swapped = sum(isinstance(p, ParallelProcessor) for p in attention_processors(model).values())
            with torch.no_grad():
                y = model(**inp)[0]
                y2 = model(**inp)[0]  # a second forward (a second step) gives the same
            handle.remove()
            out[f"{tag}:{mode}"] = {"err": rel_max(y, ref), "repeat": rel_max(y2, y), "swapped": swapped,
                                    "shape": list(y.shape) == list(ref.shape)}
        with torch.no_grad():
            restored = model(**inp)[0]
        out[f"{tag}:removed"] = {"err": float((restored - ref).abs().max()),
                                 "stock": stock == {k: type(p) for k, p in attention_processors(model).items()}}
    return out


def errors_worker(rank: int, world: int) -> dict:
    """User errors that must be clear (and raised on every rank before any collective)."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import tiny_flux, tiny_inputs

    out: dict[str, str] = {}
    model = tiny_flux(heads=3, head_dim=16)
    try:
        parallelize(model, None, mode="ulysses")
    except ValueError as exc:
        out["heads"] = str(exc)
    handle = parallelize(model, None, mode="allgather")
    try:
        parallelize(model, None, mode="ring")
    except RuntimeError as exc:
        out["twice"] = str(exc)
    inp = tiny_inputs("flux", model, seed=rank)  # different latents on each rank
    try:
        with torch.no_grad():
            model(**inp)
    except RuntimeError as exc:
        out["inputs"] = str(exc)
    handle.remove()
    return out


def parity_and_errors_worker(rank: int, world: int, cases: list, modes: list[str]) -> dict:
    return {"parity": parity_worker(rank, world, cases, modes), "errors": errors_worker(rank, world)}


def _pipe_run(pipe: Any, prompt: dict, height: int, width: int, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**prompt, height=height, width=width, num_inference_steps=PIPE_STEPS, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images.float()


def pipeline_worker(rank: int, world: int) -> dict:
    """int2 over whole pipeline calls (two resolutions), every mode; the stale hook; exact baselines."""
    torch.set_num_threads(1)
    from compact_hooks.integrations.diffusers import parallelize
    from compact_hooks.integrations.diffusers.tiny import default_flux_pipeline, default_prompt_embeds

    import compact_hooks as ch

    pipe = default_flux_pipeline(**TINY_PIPE)
    pipe.set_progress_bar_config(disable=True)
    prompt = default_prompt_embeds(pipe, text_tokens=8)
    single = _pipe_run(pipe, prompt, 64, 64)
    out: dict[str, Any] = {"class_before": type(pipe).__name__}
    exact = {}
    with parallelize(pipe, None, mode="ulysses") as handle:
        out["class_wrapped"] = type(pipe) is not handle.tracker.pipeline_class
        exact[64] = _pipe_run(pipe, prompt, 64, 64)
        exact[48] = _pipe_run(pipe, prompt, 48, 48)
    out["class_restored"] = type(pipe).__name__ == out["class_before"] and type(pipe).__bases__[0] is not type(pipe)
    out["exact_vs_single"] = rel_max(exact[64], single)

    int2 = {"compressor": "int2", "residual": "ef", "warmup_steps": 1, "warmup_compressor": None,  # full first step
            "collectives": ["all_to_all", "all_gather", "ring_exchange"]}
    for mode in ("ulysses", "allgather", "ring"):
        hook = ch.build_hook(int2)
        with parallelize(pipe, None, mode=mode, hook=hook):
            a = _pipe_run(pipe, prompt, 64, 64)
            b = _pipe_run(pipe, prompt, 48, 48)
        st = hook.stats()
        steps = st["per_step"]
        compressed = [s for s in steps if s["step"] >= 1]
        first = [s for s in steps if s["step"] == 0]
        out[mode] = {
            "err_a": rel_l2(a, exact[64]), "err_b": rel_l2(b, exact[48]),
            "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
            "requests": st.get("requests"),
            "n_steps": len(steps),
            "ratio_compressed": sum(s["raw_bytes"] for s in compressed)
            / max(1, sum(s["wire_bytes"] for s in compressed)),
            "ratio_first": [s["raw_bytes"] / s["wire_bytes"] for s in first],
            "full_sends": sorted({k["full_sends"] for k in st["per_key"].values()}),
            "keys": sorted(st["per_key"]),
        }
    stale = ch.build_hook({"hook": "stale", "warmup_steps": 1})
    with parallelize(pipe, None, mode="ulysses", hook=stale):
        s = _pipe_run(pipe, prompt, 64, 64)
    out["stale"] = {"err": rel_l2(s, exact[64]), "finite": bool(torch.isfinite(s).all())}
    return out


def native_worker(rank: int, world: int) -> dict:
    """diffusers' own Ulysses (enable_parallelism) with its all-to-alls routed through the hook."""
    torch.set_num_threads(1)
    if torch.accelerator.device_count() < 1:  # diffusers' CPU mesh setup divides by the device count
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    from compact_hooks.integrations.diffusers import compress_native_context_parallel
    from compact_hooks.integrations.diffusers.tiny import tiny_flux, tiny_inputs
    from diffusers import ContextParallelConfig
    from diffusers.models import attention_dispatch

    import compact_hooks as ch

    original = attention_dispatch._all_to_all_single
    model = tiny_flux(layers=1, single_layers=1)
    inputs = [tiny_inputs("flux", model, batch=1, height=8, width=8, text=8, timestep=t) for t in (0.9, 0.6, 0.3)]
    with torch.no_grad():
        refs = [model(**i)[0] for i in inputs]
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    keys: list[str] = []

    class Recording(ch.PassthroughHook):
        def __call__(self, call):  # type: ignore[override]
            keys.append(str(call.key))
            return super().__call__(call)

    out: dict[str, Any] = {}
    with compress_native_context_parallel(model, Recording()):
        out["patched"] = attention_dispatch._all_to_all_single is not original
        with torch.no_grad():
            out["exact_err"] = max(rel_max(model(**i)[0], r) for i, r in zip(inputs, refs))
    out["restored"] = attention_dispatch._all_to_all_single is original
    out["keys"] = keys[:8]
    hook = ch.build_hook({"compressor": "int2", "collectives": ["all_to_all"]})
    with compress_native_context_parallel(model, hook):
        with torch.no_grad():
            ys = [model(**i)[0] for i in inputs]
    st = hook.stats()
    out["int2_err"] = max(rel_l2(y, r) for y, r in zip(ys, refs))
    out["int2_requests"] = st.get("requests")
    out["int2_ratio_last"] = st["per_step"][-1]["raw_bytes"] / st["per_step"][-1]["wire_bytes"]
    return out
