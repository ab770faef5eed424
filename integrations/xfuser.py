"""xDiT (xfuser 0.7) USP attention through a CommHook, on unforked xfuser.

xfuser's ``USP`` (``xfuser/model_executor/layers/usp.py``; FLUX, FLUX.2, Wan, HunyuanVideo, Qwen-Image
and others call it from their attention processors) moves its data with torch's functional
collectives: every Ulysses all-to-all goes through ``_sdpa_all_to_all_single``
(``ft_c.all_to_all_single``, called by ``_ft_c_input_all_to_all`` for Q, K, V and any extra input,
by ``_combined_qkv_all_to_all`` / ``_combined_gqa_qkv_all_to_all`` for one packed Q/K/V exchange, and
by ``_ft_c_output_all_to_all`` for the output), and the ring runs torch's
``_templated_ring_attention`` (one K/V ``all_gather_single``, or ``permute_tensor`` shifts).

:func:`compress_xfuser` is :func:`~compact_hooks.integrations.funcol.route_functional_collectives`
over ``usp`` and torch's ring attention module, with role hints so that keys say what a call
carries: ``<attention module>:q|k|v`` (then ``in4``, ... for extra inputs), ``:qkv`` (packed),
``:o``, ``:kv`` (ring gather) or ``:kv.hopN`` (ring shifts). FP8 comms (``use_fp8_comms``) send
float8 or uint8 tensors: they take funcol unchanged, counted as ``exact``. xfuser's other
collectives (PipeFusion, CFG, VAE, ``head_balance``) are not in these modules and are not touched.

xfuser 0.7 raises ``NotImplementedError`` at import on a torch without an accelerator
(``xfuser.envs.get_device_version``); on such a machine :func:`compress_xfuser` raises an
ImportError saying so (the CPU test's import step is in ``tests/funcol_workers.py``).
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable, Optional

from compact_hooks.integrations.funcol import (
    RING_ATTENTION_MODULE,
    AttentionSelector,
    FuncolHandle,
    FuncolRouter,
    route_functional_collectives,
)
from torch import nn

from compact_hooks.hook import CommHook

__all__ = ["USP_MODULE", "compress_xfuser", "usp_module"]

USP_MODULE = "xfuser.model_executor.layers.usp"
# usp.py's all-to-all helpers and the role kind (see FuncolRouter.hint) of the calls each makes.
HINTS = {"_ft_c_input_all_to_all": "in", "_combined_qkv_all_to_all": "qkv",
         "_combined_gqa_qkv_all_to_all": "qkv", "_ft_c_output_all_to_all": "out"}


def usp_module() -> types.ModuleType:
    """``xfuser.model_executor.layers.usp``, or an ImportError that says what is missing."""
    try:
        return importlib.import_module(USP_MODULE)
    except NotImplementedError as exc:
        raise ImportError(f"xfuser refused to import ({exc}): xfuser 0.7 needs a CUDA, ROCm, MUSA, MPS or NPU "
                          f"build of torch (xfuser.envs.get_device_version)") from exc
    except ImportError as exc:
        raise ImportError(f"compact_hooks.integrations.xfuser needs xfuser 0.7 (pip install xfuser): {exc}") from exc


def _hinted(router: FuncolRouter, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with router.hint(kind):
            return fn(*args, **kwargs)

    return call


def compress_xfuser(hook: CommHook, model: nn.Module, attention: Optional[AttentionSelector] = None,
                    usp: Optional[types.ModuleType] = None) -> FuncolHandle:
    """Route xfuser USP's all-to-alls and ring exchanges made inside ``model``'s attention modules
    through ``hook`` (a context manager; ``handle.stats()`` adds ``routed`` / ``exact`` / ``unrouted``).
    Call ``hook.next_step()`` after each denoising step as with every integration."""
    usp = usp if usp is not None else usp_module()
    router = FuncolRouter(hook)
    handle = route_functional_collectives(hook, model, modules=(usp, RING_ATTENTION_MODULE),
                                          attention=attention, router=router)
    for name, kind in HINTS.items():
        if hasattr(usp, name):
            handle.swap(usp, name, _hinted(router, kind, getattr(usp, name)))
    return handle
