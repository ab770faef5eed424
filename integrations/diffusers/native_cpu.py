"""Run diffusers' native context parallelism on CPU (gloo): tests, ``compact-hooks run --mode native``.

Two things stop diffusers 0.42's ``enable_parallelism`` on a machine without an accelerator:

* ``ModelMixin._setup_parallelism`` computes ``rank % torch.accelerator.device_count()``, which is a
  division by zero on CPU;
* ring attention (``ring_degree > 1``, unified Ulysses x ring) asks the forward op of the attention
  backend for the log-sum-exp it merges the blocks with, and the native backend's op
  (``attention_dispatch._native_attention_forward_op``) refuses ``return_lse=True``; the backends
  that return it have no CPU kernel or download kernels from the Hub.

:func:`cpu_context_parallel` fixes both while it is active: ``torch.accelerator.device_count`` reports
1 when it reports 0, and :func:`lse_forward_op` stands in for ``_native_attention_forward_op``. The
stand-in calls the original op whenever ``return_lse`` is false (Ulysses: diffusers' own result, bit
for bit) and ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (which returns the
log-sum-exp) when it is true. Forward only: the backward op is left as it is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def lse_forward_op(original: Callable[..., Any]) -> Callable[..., Any]:
    """A forward op with ``_native_attention_forward_op``'s signature that can return the log-sum-exp on CPU.

    ``return_lse=False`` calls ``original``; ``return_lse=True`` returns ``(out, lse)`` in diffusers'
    model layout (``out``: ``[B, S, H, D]``, ``lse``: ``[B, S, H]``, float32).
    """

    def forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                   _save_ctx: bool = True, _parallel_config: Any = None) -> Any:
        if not return_lse or query.device.type != "cpu":
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if enable_gqa:
            raise ValueError("the CPU log-sum-exp attention op does not support enable_gqa=True")
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
            ctx.attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.enable_gqa = (
                attn_mask, dropout_p, is_causal, scale, enable_gqa)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=_additive_mask(attn_mask, q.dtype), scale=scale)
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)

    forward_op.compact_hooks_cpu_lse = True  # type: ignore[attr-defined]
    return forward_op


@contextlib.contextmanager
def cpu_context_parallel() -> Iterator[None]:
    """While active: ``torch.accelerator.device_count()`` is at least 1 and the native attention backend's
    forward op returns the log-sum-exp on CPU (see the module docstring). Enter it around
    ``enable_parallelism`` and the forwards; both are put back on exit."""
    from diffusers.models import attention_dispatch

    original_count = torch.accelerator.device_count
    original_op = attention_dispatch._native_attention_forward_op
    if original_count() < 1:
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    if not getattr(original_op, "compact_hooks_cpu_lse", False):
        attention_dispatch._native_attention_forward_op = lse_forward_op(original_op)
    try:
        yield
    finally:
        attention_dispatch._native_attention_forward_op = original_op
        torch.accelerator.device_count = original_count  # type: ignore[assignment]
