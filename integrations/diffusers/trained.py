"""The embedded *trained* FLUX-architecture model: class-conditional digits (scikit-learn's 8x8 digits, upsampled).

A small ``FluxTransformer2DModel`` (1.8 M parameters, fp16 safetensors in ``weights/flux-digits``) trained
with flow matching (:mod:`.train_tiny`) on 16x16 grey digits. The
image is the latent: one channel, packed by ``FluxPipeline`` into 2x2 patches, so a 16x16 image is 64
tokens of 4 channels. The "prompt" is a class label (``"7"``) mapped to a fixed embedding shipped with the
weights (``class_embeddings.safetensors``): ``prompt_embeds`` [10, T, 32] and ``pooled_prompt_embeds`` [10, 32].

:class:`DigitsFluxPipeline` is a ``FluxPipeline`` (the stock denoising loop and scheduler) without text
encoders or VAE: it looks the label up, runs ``FluxPipeline.__call__`` with ``output_type="latent"`` and
unpacks the latents to images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import FluxPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "flux-digits"
EMBEDDINGS_FILE = "class_embeddings.safetensors"
IMAGE_SIZE = 16
NUM_CLASSES = 10
TEXT_TOKENS = 4
MODEL_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

Prompt = Union[str, int, Sequence[Union[str, int]]]


def digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as ``([N, 1, size, size] in [-1, 1], labels [N])`` (bilinear upsampling)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'compact-hooks[quality]'") from exc
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1), torch.as_tensor(d.target, dtype=torch.long)


def to_digits_scale(images: torch.Tensor) -> torch.Tensor:
    """Images ``[N, 1, S, S]`` in [0, 1] back to scikit-learn's 8x8 digits scale (0..16), flattened ``[N, 64]``."""
    x = torch.nn.functional.adaptive_avg_pool2d(images.float(), 8)
    return (x * 16.0).clamp(0, 16).flatten(1)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` -> Flux tokens ``[B, H/2 * W/2, 4]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = images.shape
    return images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Flux ``img_ids`` of a ``height`` x ``width`` latent (packed: ``height/2 * width/2`` rows)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def class_embeddings(seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed (seeded) unit-variance embeddings per class; written next to the weights by ``train_tiny``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(NUM_CLASSES, TEXT_TOKENS, MODEL_CONFIG["joint_attention_dim"], generator=g),
        "pooled_prompt_embeds": torch.randn(NUM_CLASSES, MODEL_CONFIG["pooled_projection_dim"], generator=g),
    }


def labels_of(prompt: Prompt) -> list[int]:
    """Class labels from a prompt: ``"7"``, ``7``, ``["0", "3"]`` or ``"0 3 7"``."""
    items: list[Any] = prompt.split() if isinstance(prompt, str) else [prompt] if isinstance(prompt, int) \
        else list(prompt)
    labels = []
    for item in items:
        try:
            label = int(str(item).strip())
        except ValueError:
            label = -1
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"prompt {item!r}: the digits model knows the classes 0..{NUM_CLASSES - 1}; "
                             f"ask for one of them, e.g. prompt=\"7\"")
        labels.append(label)
    if not labels:
        raise ValueError("empty prompt: give a class label 0..9, e.g. prompt=\"7\"")
    return labels


class DigitsFluxPipeline(FluxPipeline):
    """``FluxPipeline`` whose prompt is a digit class; the latent is the image (no VAE, no text encoders)."""

    def __init__(self, scheduler: Any, vae: Any = None, text_encoder: Any = None, tokenizer: Any = None,
                 text_encoder_2: Any = None, tokenizer_2: Any = None, transformer: Any = None,
                 image_encoder: Any = None, feature_extractor: Any = None) -> None:
        # FluxPipeline's signature (diffusers checks the components against it); only two are used
        super().__init__(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                         tokenizer_2=None, transformer=transformer)
        self.vae_scale_factor = 1  # latent pixels are image pixels
        self.embeddings: dict[str, torch.Tensor] = {}

    def set_class_embeddings(self, embeddings: dict[str, torch.Tensor]) -> "DigitsFluxPipeline":
        """Set the per-class ``prompt_embeds`` [10, T, D] / ``pooled_prompt_embeds`` [10, P] (kept on CPU)."""
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(embeddings)
        if missing:
            raise ValueError(f"class embeddings need {sorted(missing)}")
        self.embeddings = {k: v.detach().float().cpu() for k, v in embeddings.items()}
        return self

    def prompt_kwargs(self, prompt: Prompt) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` / ``pooled_prompt_embeds`` of the labels, in the transformer's dtype and device."""
        if not self.embeddings:
            raise RuntimeError("no class embeddings: use load_trained_pipeline() or set_class_embeddings()")
        idx = torch.tensor(labels_of(prompt))
        p = next(self.transformer.parameters())
        return {k: v[idx].to(device=p.device, dtype=p.dtype) for k, v in self.embeddings.items()}

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: Prompt = "0",
        num_inference_steps: int = 20,
        height: int = IMAGE_SIZE,
        width: int = IMAGE_SIZE,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pt",
        callback_on_step_end: Any = None,
        guidance_scale: Optional[float] = None,
        latents: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Any:
        """Sample ``len(labels)`` images; ``output_type`` ``"pt"`` (``[B, 1, H, W]`` in [0, 1]), ``"np"``,
        ``"pil"`` or ``"latent"`` (packed). ``guidance_scale`` is accepted and ignored (no guidance embedding)."""
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be pt, np, pil or latent; got {output_type!r}")
        packed = super().__call__(
            **self.prompt_kwargs(prompt), num_inference_steps=num_inference_steps, height=height, width=width,
            generator=generator, output_type="latent", callback_on_step_end=callback_on_step_end,
            latents=latents, return_dict=False)[0]
        if output_type == "latent":
            images: Any = packed
        else:
            x = self._unpack_latents(packed, height, width, self.vae_scale_factor)
            images = ((x.float() + 1) / 2).clamp(0, 1).cpu()
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                from PIL import Image

                images = [Image.fromarray((im[0] * 255).round().to(torch.uint8).numpy()) for im in images]
        return FluxPipelineOutput(images=images) if return_dict else (images,)


def build_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def random_transformer(seed: int = 0) -> Any:
    """An untrained transformer of the same architecture (seeded)."""
    from diffusers import FluxTransformer2DModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return FluxTransformer2DModel(**MODEL_CONFIG).eval()
    finally:
        torch.random.set_rng_state(state)


def load_trained_pipeline(path: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32,
                          device: Union[str, torch.device] = "cpu", random_weights: bool = False) -> DigitsFluxPipeline:
    """The digits pipeline from ``path`` (default: the weights shipped in the package), loaded with
    ``FluxTransformer2DModel.from_pretrained``; ``random_weights`` swaps in an untrained transformer."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    root = Path(path) if path is not None else WEIGHTS_DIR
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json; train a model there with "
                                f"`python -m compact_hooks.integrations.diffusers.train_tiny --out {root}`")
    transformer = random_transformer().to(dtype=dtype) if random_weights else \
        FluxTransformer2DModel.from_pretrained(root, torch_dtype=dtype, local_files_only=True)
    pipe = DigitsFluxPipeline(scheduler=build_scheduler(), transformer=transformer.eval())
    return pipe.set_class_embeddings(load_file(root / EMBEDDINGS_FILE)).to(device)


def image_grid(images: torch.Tensor, cols: int, scale: int = 1) -> torch.Tensor:
    """``[N, C, H, W]`` images as one ``[C, rows*H*scale, cols*W*scale]`` grid (missing cells black)."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    cells = torch.zeros(rows * cols, c, h, w, dtype=images.dtype)
    cells[:n] = images
    grid = cells.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2) if scale > 1 else grid
