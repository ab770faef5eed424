"""Rank programs of tests/test_native_cp.py: diffusers' native context parallelism routed through hooks.

Tiny random configs of every diffusers transformer with a ``_cp_plan`` that runs on CPU; one spawned
process group runs every model and layout of a world size.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from compact_hooks.integrations.diffusers.tiny import _seeded, tiny_flux
from torch import nn


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def tiny_flux2(seed: int = 0) -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return _seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False))


# Wan and the models built on its blocks (ChronoEdit, Helios) share a constructor's arguments
WAN_LIKE = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32)


def _wan_like(cls_name: str, seed: int, **kwargs: Any) -> nn.Module:
    import diffusers

    return _seeded(seed, lambda: getattr(diffusers, cls_name)(**WAN_LIKE, **kwargs))


def tiny_wan(seed: int = 0) -> nn.Module:
    return _wan_like("WanTransformer3DModel", seed, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


def tiny_chronoedit(seed: int = 0) -> nn.Module:
    return _wan_like("ChronoEditTransformer3DModel", seed, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


def tiny_helios(seed: int = 0) -> nn.Module:  # its _cp_plan names 40 blocks
    return _wan_like("HeliosTransformer3DModel", seed, ffn_dim=32, num_layers=40, rope_dim=(4, 6, 6))


def tiny_qwenimage(seed: int = 0) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))


def tiny_ltx(seed: int = 0) -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return _seeded(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
        num_layers=2, caption_channels=32))


def _inputs(family: str, model: nn.Module, x: torch.Tensor, t: float, seed: int = 0, text: int = 8,
            mask: bool = True) -> dict[str, Any]:
    """The forward kwargs of ``family`` for latents ``x`` (the state of a tiny sampling loop) at ``t``;
    ``text`` text tokens (Flux, Flux2: 7 makes the shards uneven); ``mask``: QwenImage's text mask
    (diffusers gathers a local mask for Ulysses only; ring and unified attention apply it unchanged)."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.tensor([t])
    if family in ("flux", "flux2"):
        h = w = 4
        ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
        if family == "flux":
            img_ids = torch.cat([torch.zeros(h * w, 1), ids], 1)
            return dict(hidden_states=x, encoder_hidden_states=_randn(g, 1, text, 32), pooled_projections=_randn(g, 1, 32),
                        timestep=ts, img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)
        img_ids = torch.cat([torch.zeros(h * w, 1), ids, torch.zeros(h * w, 1)], 1).unsqueeze(0)
        txt_ids = torch.cat([torch.zeros(text, 3), torch.arange(text).float()[:, None]], 1).unsqueeze(0)
        return dict(hidden_states=x, encoder_hidden_states=_randn(g, 1, text, 32), timestep=ts, img_ids=img_ids,
                    txt_ids=txt_ids, return_dict=False)
    if family in ("wan", "chronoedit", "helios"):
        return dict(hidden_states=x, timestep=ts * 1000, encoder_hidden_states=_randn(g, 1, 8, 32), return_dict=False)
    if family == "qwenimage":
        return dict(hidden_states=x, encoder_hidden_states=_randn(g, 1, 8, 32),
                    encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool) if mask else None, timestep=ts,
                    img_shapes=[(1, 4, 4)], return_dict=False)
    if family == "ltx":
        return dict(hidden_states=x, encoder_hidden_states=_randn(g, 1, 8, 32), timestep=ts * 1000,
                    encoder_attention_mask=None, num_frames=2, height=4, width=4, return_dict=False)
    raise ValueError(family)


def _latents(family: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shapes = {"flux": (1, 16, 16), "flux2": (1, 16, 16), "wan": (1, 4, 2, 8, 8), "chronoedit": (1, 4, 2, 8, 8),
              "helios": (1, 4, 2, 8, 8), "qwenimage": (1, 16, 16),
              "ltx": (1, 32, 8)}
    return _randn(g, *shapes[family])


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "flux": lambda: tiny_flux(layers=1, single_layers=1), "flux2": tiny_flux2, "wan": tiny_wan, "chronoedit": tiny_chronoedit,
    "helios": tiny_helios,
    "qwenimage": tiny_qwenimage, "ltx": tiny_ltx}


def sample(model: nn.Module, family: str, steps: int, text: int = 8, mask: bool = True) -> list[torch.Tensor]:
    """``steps`` Euler steps from fixed latents; the model output of each step."""
    x = _latents(family)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = 1.0 - i / steps
            y = model(**_inputs(family, model, x, t, text=text, mask=mask))[0]
            outs.append(y)
            x = x - y / steps
    return outs


HOOKS: dict[str, dict[str, Any]] = {
    "none": {"compressor": "none", "warmup_compressor": None},
    "int8": {"compressor": "int8", "residual": "ef"},
    "int2": {"compressor": "int2", "residual": "ef"},
}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def padded_gather_anything() -> Iterator[None]:
    """Test-only: diffusers' ``_all_gather_anything`` (the output gather of ``*_anything``) calls
    ``dist.all_gather`` with unequal shapes, which gloo refuses; gather them padded instead (exact)."""
    from diffusers.hooks import context_parallel
    from diffusers.models._modeling_parallel import gather_size_by_comm

    original = context_parallel._all_gather_anything

    def gather(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        sizes = gather_size_by_comm(tensor.shape[dim], group)
        m = max(sizes)
        pad = list(tensor.shape)
        pad[dim] = m - tensor.shape[dim]
        full = torch.cat([tensor, tensor.new_zeros(pad)], dim).contiguous()
        parts = [torch.empty_like(full) for _ in sizes]
        dist.all_gather(parts, full, group=group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    context_parallel._all_gather_anything = gather
    try:
        yield
    finally:
        context_parallel._all_gather_anything = original


def native_table_worker(rank: int, world: int, layouts: list[dict[str, Any]], families: list[str],
                        steps: int) -> dict[str, Any]:
    """For each layout (ContextParallelConfig kwargs, plus ``text``: Flux/Flux2 text tokens) and family:
    diffusers' native result, then the same with every collective through PassthroughHook, ``none``,
    int8 and int2; errors against the native one and one process."""
    from compact_hooks.integrations.diffusers import compress_native_context_parallel
    from compact_hooks.integrations.diffusers.native_cpu import cpu_context_parallel
    from diffusers import ContextParallelConfig

    import compact_hooks as ch

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with cpu_context_parallel():
        for layout in layouts:
            name = ",".join(f"{k}={v}" for k, v in layout.items() if k != "families")
            layout = dict(layout)
            text = layout.pop("text", 8)
            mask = layout.get("ring_degree", 1) == 1
            for family in layout.pop("families", families):
                single = sample(BUILDERS[family](), family, steps, text, mask)
                model = BUILDERS[family]()
                model.enable_parallelism(config=ContextParallelConfig(**layout))
                with padded_gather_anything():
                    native = sample(model, family, steps, text, mask)
                row: dict[str, Any] = {"single_err": max(_rel_l2(a, b) for a, b in zip(native, single))}
                keys: list[str] = []

                class Recording(ch.PassthroughHook):
                    def start(self, call):  # type: ignore[override]
                        keys.append(str(call.key))
                        return super().start(call)

                hooks: dict[str, Any] = {"passthrough": Recording()}
                hooks.update({n: ch.build_hook(c) for n, c in HOOKS.items()})
                for hname, hook in hooks.items():
                    with compress_native_context_parallel(model, hook) as handle:
                        ys = sample(model, family, steps, text, mask)
                    st = handle.stats()
                    row[hname] = {
                        "equal": all(torch.equal(a, b) for a, b in zip(ys, native)),
                        "err": max(_rel_l2(a, b) for a, b in zip(ys, native)),
                        "err_last": _rel_l2(ys[-1], native[-1]),
                        "unrouted": st["unrouted"], "unrouted_ops": st["unrouted_ops"],
                        "routed": st["routed"], "exact": st["exact"],
                        "ratio": st.get("compression_ratio"),
                    }
                row["keys"] = sorted(set(keys))
                out[f"{name}/{family}"] = row
    return out


def native_probe_worker(rank: int, world: int) -> dict[str, Any]:
    """A collective the router does not know (an all_reduce through attention_dispatch.dist inside an
    attention) is counted as unrouted; remove() puts back every name it replaced."""
    from compact_hooks.integrations.diffusers import compress_native_context_parallel
    from compact_hooks.integrations.diffusers.native_cpu import cpu_context_parallel
    from diffusers import ContextParallelConfig
    from diffusers.hooks import context_parallel
    from diffusers.models import _modeling_parallel, attention_dispatch

    import compact_hooks as ch

    names = [(attention_dispatch, "_all_to_all_single"), (attention_dispatch, "funcol"), (attention_dispatch, "dist"),
             (context_parallel, "funcol"), (context_parallel, "dist"), (_modeling_parallel, "dist")]
    before = [getattr(m, n) for m, n in names]
    with cpu_context_parallel():
        model = BUILDERS["flux"]()
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))

        def stray(module: nn.Module, args: tuple) -> None:
            attention_dispatch.dist.all_reduce(torch.ones(1))

        h = model.transformer_blocks[0].attn.register_forward_pre_hook(stray)
        with compress_native_context_parallel(model, ch.PassthroughHook()) as handle:
            sample(model, "flux", 2)
            attention_dispatch.dist.all_reduce(torch.ones(1))  # outside the forward: not counted
        h.remove()
    st = handle.stats()
    return {"unrouted": st["unrouted"], "unrouted_ops": st["unrouted_ops"],
            "restored": all(getattr(m, n) is b for (m, n), b in zip(names, before))}
