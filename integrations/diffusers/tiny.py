"""Random-weight diffusers models built from config (no downloads), with matching random inputs.

Used by the tests (tiny transformers of every supported family) and by ``compact-hooks run`` without
``--model`` (:func:`default_flux_pipeline`). Weights and inputs are drawn from seeded generators, so
every rank builds the same model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


def tiny_flux(seed: int = 0, heads: int = 4, head_dim: int = 16, layers: int = 1, single_layers: int = 1,
              in_channels: int = 16) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    third = head_dim // 4
    return _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(third, third, head_dim - 2 * third)))


def tiny_sd3(seed: int = 0, heads: int = 4) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    # Two blocks: the last is context_pre_only; block 0 has SD3.5's second (image-only) attention.
    return _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=8 * heads,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,),
        qk_norm="rms_norm"))


def tiny_pixart(seed: int = 0, heads: int = 4) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return _seeded(seed, lambda: PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=heads,
        caption_channels=32, in_channels=4, cross_attention_dim=8 * heads, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6))


def tiny_dit(seed: int = 0, heads: int = 4) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return _seeded(seed, lambda: DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000))


def tiny_cogvideox(seed: int = 0, heads: int = 4, rotary: bool = False) -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return _seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=rotary))


TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart, "dit": tiny_dit, "cogvideox": tiny_cogvideox,
}


def tiny_inputs(family: str, model: nn.Module, seed: int = 0, batch: int = 2, height: int = 4, width: int = 4,
                text: Optional[int] = None, frames: int = 3, timestep: float = 0.5) -> dict[str, Any]:
    """Random forward kwargs for a tiny model (``height``/``width`` in latent pixels; ``text`` tokens,
    by default 6, or CogVideoX's ``max_text_seq_length`` where its sincos embedding needs exactly that)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if text is None:
        text = cfg.max_text_seq_length if family == "cogvideox" and not cfg.use_rotary_positional_embeddings else 6

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if family == "flux":
        n = height * width
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                             indexing="ij"), dim=-1).reshape(n, 3).float()
        return dict(hidden_states=randn(batch, n, cfg.in_channels),
                    encoder_hidden_states=randn(batch, text, cfg.joint_attention_dim),
                    pooled_projections=randn(batch, cfg.pooled_projection_dim),
                    timestep=torch.full((batch,), timestep), img_ids=img_ids,
                    txt_ids=torch.randint(0, 5, (text, 3), generator=g).float(), return_dict=False)
    if family == "sd3":
        return dict(hidden_states=randn(batch, cfg.in_channels, height, width),
                    encoder_hidden_states=randn(batch, text, cfg.joint_attention_dim),
                    pooled_projections=randn(batch, cfg.pooled_projection_dim),
                    timestep=torch.full((batch,), timestep * 1000), return_dict=False)
    if family == "pixart":
        return dict(hidden_states=randn(batch, cfg.in_channels, height, width),
                    encoder_hidden_states=randn(batch, text, cfg.caption_channels),
                    timestep=torch.full((batch,), timestep * 1000),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if family == "dit":
        return dict(hidden_states=randn(batch, cfg.in_channels, height, width),
                    timestep=torch.full((batch,), timestep * 1000).long(),
                    class_labels=torch.randint(0, 1000, (batch,), generator=g), return_dict=False)
    if family == "cogvideox":
        kwargs: dict[str, Any] = dict(
            hidden_states=randn(batch, frames, cfg.in_channels, height, width),
            encoder_hidden_states=randn(batch, text, cfg.text_embed_dim),
            timestep=torch.full((batch,), int(timestep * 1000)), return_dict=False)
        if cfg.use_rotary_positional_embeddings:
            n = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
            angles = randn(n, cfg.attention_head_dim // 2).repeat_interleave(2, dim=-1)
            kwargs["image_rotary_emb"] = (angles.cos(), angles.sin())
        return kwargs
    raise ValueError(f"unknown family {family!r}; one of {', '.join(TINY_MODELS)}")


# ---- the embedded default model of `compact-hooks run` -----------------------------------------

DEFAULT_FLUX = dict(heads=8, head_dim=64, layers=2, single_layers=4, latent_channels=16, text_tokens=64,
                    vae_blocks=(32, 32))


def default_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight FLUX-architecture ``FluxPipeline`` (no text encoders; tiny VAE from config).

    Pass ``prompt_embeds``/``pooled_prompt_embeds`` from :func:`default_prompt_embeds`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    p = {**DEFAULT_FLUX, **overrides}
    head_dim = int(p["head_dim"])
    third = head_dim // 4 // 2 * 2
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4 * int(p["latent_channels"]), num_layers=int(p["layers"]),
        num_single_layers=int(p["single_layers"]), attention_head_dim=head_dim,
        num_attention_heads=int(p["heads"]), joint_attention_dim=256, pooled_projection_dim=128,
        axes_dims_rope=(third, third, head_dim - 2 * third)))
    blocks = tuple(int(c) for c in p["vae_blocks"])
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks, layers_per_block=1,
        latent_channels=int(p["latent_channels"]), norm_num_groups=min(32, blocks[0]), scaling_factor=1.0,
        shift_factor=0.0))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def default_prompt_embeds(pipe: Any, seed: int = 0, text_tokens: int = DEFAULT_FLUX["text_tokens"],
                          batch: int = 1) -> dict[str, torch.Tensor]:
    """Random ``prompt_embeds``/``pooled_prompt_embeds`` matching ``pipe.transformer``'s config."""
    g = torch.Generator().manual_seed(seed + 2)
    cfg = pipe.transformer.config
    dtype = pipe.transformer.dtype
    return {
        "prompt_embeds": torch.randn(batch, int(text_tokens), cfg.joint_attention_dim, generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
    }
