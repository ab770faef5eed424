"""A FLUX model directory of one's own as a pipeline driven by prompt embeddings (no text encoders), for
``compact-hooks run --model DIR`` and ``compact-hooks bench quality --model DIR``.

Two kinds of directory are read (local files only):

* a **transformer-only** directory: ``config.json`` (``"_class_name": "FluxTransformer2DModel"``) and its
  weights, as ``FluxTransformer2DModel.save_pretrained`` writes them. It is wrapped in a
  :class:`LatentFluxPipeline`: FluxPipeline's denoising loop with a default
  ``FlowMatchEulerDiscreteScheduler`` (:data:`SCHEDULER`, FLUX.1's settings), no text encoders and no
  VAE. Its "images" are the final latents, unpacked to ``[N, C, H/8, W/8]`` and mapped to [0, 1] by
  ``latent / LATENT_SPAN + 0.5`` (clamped): PSNR and SSIM then compare latents over a span of 8.
* a **FluxPipeline** directory (``model_index.json``): loaded without its text encoders and tokenizers;
  images are decoded by its VAE as usual.

Prompts are embeddings: a ``.safetensors`` (or ``torch.save``) file holding ``prompt_embeds`` ``[N, T, D]``
and ``pooled_prompt_embeds`` ``[N, P]`` (``D`` = the transformer's ``joint_attention_dim``, ``P`` its
``pooled_projection_dim``), or, without a file, :func:`random_prompt_embeds`: standard normal values from
a seed, ``T`` = :data:`RANDOM_TEXT_TOKENS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import FluxPipeline

LATENT_SPAN = 8.0
RANDOM_TEXT_TOKENS = 32
SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
DEFAULTS = {"steps": 20, "height": 256, "width": 256, "guidance_scale": 3.5}


def directory_kind(path: Union[str, Path]) -> str:
    """``"transformer"`` or ``"pipeline"``; anything else raises ``ValueError`` saying what is expected."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--model {path}: not a directory")
    if (root / "model_index.json").is_file():
        return "pipeline"
    config = root / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_class_name")
        if name == "FluxTransformer2DModel":
            return "transformer"
        raise ValueError(f"--model {path}: config.json is a {name}, not a FluxTransformer2DModel")
    raise ValueError(f"--model {path}: neither a diffusers pipeline directory (model_index.json) nor a "
                     f"FluxTransformer2DModel directory (config.json + weights, as save_pretrained writes them)")


class LatentFluxPipeline(FluxPipeline):
    """``FluxPipeline`` around a bare transformer: prompt embeddings in, latents mapped to [0, 1] out."""

    def __init__(self, scheduler: Any, vae: Any = None, text_encoder: Any = None, tokenizer: Any = None,
                 text_encoder_2: Any = None, tokenizer_2: Any = None, transformer: Any = None,
                 image_encoder: Any = None, feature_extractor: Any = None) -> None:
        super().__init__(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                         tokenizer_2=None, transformer=transformer)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        num_inference_steps: int = DEFAULTS["steps"],
        height: int = DEFAULTS["height"],
        width: int = DEFAULTS["width"],
        guidance_scale: float = DEFAULTS["guidance_scale"],
        generator: Optional[torch.Generator] = None,
        output_type: str = "pt",
        callback_on_step_end: Any = None,
        latents: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Any:
        """``output_type`` ``"pt"``: ``[N, C, H/8, W/8]`` in [0, 1] (see the module); ``"latent"``: packed."""
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError("a transformer-only model takes prompt_embeds and pooled_prompt_embeds "
                             "(--prompt-embeds FILE, or random ones)")
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be pt or latent; got {output_type!r}")
        packed = super().__call__(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            num_inference_steps=num_inference_steps, height=height, width=width, guidance_scale=guidance_scale,
            generator=generator, output_type="latent", callback_on_step_end=callback_on_step_end, latents=latents,
            return_dict=False)[0]
        images: Any = packed
        if output_type == "pt":
            x = self._unpack_latents(packed, height, width, self.vae_scale_factor)
            images = (x.float() / LATENT_SPAN + 0.5).clamp(0, 1).cpu()
        return FluxPipelineOutput(images=images) if return_dict else (images,)


def load_model_dir(path: Union[str, Path], dtype: torch.dtype = torch.float32,
                   device: Union[str, torch.device] = "cpu") -> Any:
    """The pipeline of a transformer-only or FluxPipeline directory (see the module), without text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if directory_kind(path) == "pipeline":
        pipe = FluxPipeline.from_pretrained(path, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                            tokenizer_2=None, torch_dtype=dtype, local_files_only=True)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        pipe = LatentFluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=transformer.eval())
    return pipe.to(device)


def embedding_widths(config: Any) -> tuple[int, int]:
    """``(D, P)``: ``joint_attention_dim`` and ``pooled_projection_dim`` of a transformer, its config, or
    the mapping ``FluxTransformer2DModel.load_config`` returns."""
    config = getattr(config, "config", config)
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    return int(get("joint_attention_dim")), int(get("pooled_projection_dim"))


def random_prompt_embeds(config: Any, n: int = 1, seed: int = 0,
                         text_tokens: int = RANDOM_TEXT_TOKENS) -> dict[str, torch.Tensor]:
    """Standard normal ``prompt_embeds`` ``[n, text_tokens, D]`` and ``pooled_prompt_embeds`` ``[n, P]``
    for the transformer (or config) ``config``."""
    d, p = embedding_widths(config)
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(n, text_tokens, d, generator=g),
            "pooled_prompt_embeds": torch.randn(n, p, generator=g)}


def read_prompt_embeds(path: Union[str, Path], config: Any) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``pooled_prompt_embeds`` from a file, checked against the transformer's (or
    config's) widths."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(data if isinstance(data, dict) else ())
    if missing:
        raise ValueError(f"--prompt-embeds {path}: needs tensors prompt_embeds [N, T, D] and "
                         f"pooled_prompt_embeds [N, P]; missing {sorted(missing)}")
    pe, pooled = data["prompt_embeds"], data["pooled_prompt_embeds"]
    d, p = embedding_widths(config)
    if pe.dim() != 3 or pe.shape[-1] != d or tuple(pooled.shape) != (pe.shape[0], p):
        raise ValueError(f"--prompt-embeds {path}: prompt_embeds {tuple(pe.shape)} / pooled_prompt_embeds "
                         f"{tuple(pooled.shape)} do not fit the transformer: expected [N, T, {d}] and [N, {p}]")
    return {"prompt_embeds": pe.float(), "pooled_prompt_embeds": pooled.float()}
