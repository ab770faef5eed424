"""Per-model-family plans: where tokens are sharded and gathered, and which processors are swapped.

A plan installs forward hooks on submodules of the transformer (removable) and says which parallel
processor replaces each stock attention processor:

* Flux: the transformer's inputs are token sequences already: ``hidden_states``/``img_ids`` (image)
  and ``encoder_hidden_states``/``txt_ids`` (text) are sharded before the forward, so the rotary
  embedding built from the sharded ids matches the local tokens; ``proj_out``'s output is gathered.
* SD3: image tokens are sharded after ``pos_embed`` (patchify + positional embedding of the whole
  image), text tokens after ``context_embedder``; ``proj_out``'s output is gathered before unpatchify.
* PixArt / DiT: image tokens sharded after ``pos_embed``; the text is only the K/V of cross-attention,
  which stays replicated and local; ``proj_out`` (PixArt) / ``proj_out_2`` (DiT) output is gathered.
* CogVideoX: ``patch_embed`` sees the full text and video (its positional embedding needs both), its
  output is split into text and video and both are sharded; the transformer is given the sharded
  ``encoder_hidden_states`` (it splits ``patch_embed``'s output by that length) and the sharded
  ``image_rotary_emb``; ``proj_out``'s output is gathered.

Text and image tokens are both sharded (each padded to a multiple of the group size): no rank repeats
another's work, and the joint attention stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import processors as P
from .sharding import ShardState

InputSharder = Callable[[ShardState, dict[str, Any]], None]
Installer = Callable[[nn.Module, ShardState], list[RemovableHandle]]


@dataclass(frozen=True)
class Family:
    """How to parallelize one transformer class."""

    name: str
    processors: dict[str, type]  # stock processor class name -> parallel processor class
    shard_inputs: InputSharder  # edits the bound forward arguments in place
    install: Installer  # forward hooks on submodules


def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def _shard_hook(state: ShardState, segment: str):
    return _output_hook(lambda x: state.shard(x, 1, segment))


def _gather_hook(state: ShardState, segment: str):
    return _output_hook(lambda x: state.gather(x, 1, segment))


def _shard_list(state: ShardState, xs: Optional[list], segment: str) -> Optional[list]:
    return None if xs is None else [None if x is None else state.shard(x, 1, segment) for x in xs]


# ---- Flux --------------------------------------------------------------------------------------


def _flux_inputs(state: ShardState, a: dict[str, Any]) -> None:
    for name in ("txt_ids", "img_ids"):
        ids = a.get(name)
        if ids is not None and ids.ndim == 3:  # deprecated batched ids: diffusers uses ids[0]
            a[name] = ids = ids[0]
    a["hidden_states"] = state.shard(a["hidden_states"], 1, "image")
    a["img_ids"] = state.shard(a["img_ids"], 0, "image")
    a["encoder_hidden_states"] = state.shard(a["encoder_hidden_states"], 1, "text")
    a["txt_ids"] = state.shard(a["txt_ids"], 0, "text")
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if a.get(name) is not None:
            a[name] = _shard_list(state, a[name], "image")


def _flux_install(model: nn.Module, state: ShardState) -> list[RemovableHandle]:
    return [model.proj_out.register_forward_hook(_gather_hook(state, "image"))]


# ---- SD3 ---------------------------------------------------------------------------------------


def _sd3_inputs(state: ShardState, a: dict[str, Any]) -> None:
    # Controlnet residuals are image token sequences, added to hidden_states block by block.
    if a.get("block_controlnet_hidden_states") is not None:
        a["block_controlnet_hidden_states"] = _shard_list(state, a["block_controlnet_hidden_states"], "image")


def _sd3_install(model: nn.Module, state: ShardState) -> list[RemovableHandle]:
    return [
        model.pos_embed.register_forward_hook(_shard_hook(state, "image")),
        model.context_embedder.register_forward_hook(_shard_hook(state, "text")),
        model.proj_out.register_forward_hook(_gather_hook(state, "image")),
    ]


# ---- PixArt / DiT ------------------------------------------------------------------------------


def _no_inputs(state: ShardState, a: dict[str, Any]) -> None:
    pass


def _patch_install(out_module: str) -> Installer:
    def install(model: nn.Module, state: ShardState) -> list[RemovableHandle]:
        return [
            model.pos_embed.register_forward_hook(_shard_hook(state, "image")),
            model.get_submodule(out_module).register_forward_hook(_gather_hook(state, "image")),
        ]

    return install


# ---- CogVideoX ---------------------------------------------------------------------------------


def _cogvideox_inputs(state: ShardState, a: dict[str, Any]) -> None:
    text = a["encoder_hidden_states"]
    state.stash["text"] = text
    a["encoder_hidden_states"] = state.shard(text, 1, "text")
    rotary = a.get("image_rotary_emb")
    if rotary is not None:
        a["image_rotary_emb"] = tuple(state.shard(f, 0, "image") for f in rotary)


def _cogvideox_install(model: nn.Module, state: ShardState) -> list[RemovableHandle]:
    def full_text(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        text = state.stash.get("text")
        if text is None:
            return args, kwargs
        if args:
            return (text, *args[1:]), kwargs
        return args, {**kwargs, "text_embeds": text}

    def split_and_shard(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        text_len = state.stash["text"].shape[1]
        text = state.shard(output[:, :text_len], 1, "text")
        video = state.shard(output[:, text_len:], 1, "image")
        return torch.cat([text, video], dim=1)

    return [
        model.patch_embed.register_forward_pre_hook(full_text, with_kwargs=True),
        model.patch_embed.register_forward_hook(split_and_shard),
        model.proj_out.register_forward_hook(_gather_hook(state, "image")),
    ]


FAMILIES: dict[str, Family] = {
    "FluxTransformer2DModel": Family(
        "flux", {"FluxAttnProcessor": P.FluxParallelProcessor}, _flux_inputs, _flux_install
    ),
    "SD3Transformer2DModel": Family(
        "sd3", {"JointAttnProcessor2_0": P.JointParallelProcessor}, _sd3_inputs, _sd3_install
    ),
    "PixArtTransformer2DModel": Family(
        "pixart", {"AttnProcessor2_0": P.SelfParallelProcessor}, _no_inputs, _patch_install("proj_out")
    ),
    "DiTTransformer2DModel": Family(
        "dit", {"AttnProcessor2_0": P.SelfParallelProcessor}, _no_inputs, _patch_install("proj_out_2")
    ),
    "CogVideoXTransformer3DModel": Family(
        "cogvideox",
        {"CogVideoXAttnProcessor2_0": P.CogVideoXParallelProcessor},
        _cogvideox_inputs,
        _cogvideox_install,
    ),
}


def family_of(model: nn.Module) -> Family:
    for cls in type(model).__mro__:
        fam = FAMILIES.get(cls.__name__)
        if fam is not None:
            return fam
    raise TypeError(
        f"parallelize() supports {', '.join(sorted(FAMILIES))}; got {type(model).__name__} (for models with "
        f"diffusers' native context parallelism use enable_parallelism() and compress_native_context_parallel())"
    )


def is_self_attention(module: nn.Module) -> bool:
    return not getattr(module, "is_cross_attention", False)
