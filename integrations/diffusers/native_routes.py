"""The collectives of diffusers' native context parallelism, routed through a CommHook.

diffusers 0.42 makes every collective of ``enable_parallelism(config=ContextParallelConfig(...))``
through four names, which :class:`Router` stands in for while the model's forward runs:

* ``attention_dispatch._all_to_all_single(x, group)``: the equal all-to-alls of Ulysses and of the
  unified Ulysses x ring attention (Q, K, V, the output, the log-sum-exp): the hook's ``all_to_all``;
* ``funcol`` (``torch.distributed._functional_collectives``) in ``attention_dispatch`` and
  ``hooks.context_parallel``: ``all_gather_tensor`` / ``all_gather_single`` (ring attention's one
  all-gather of ``cat([k.flatten(), v.flatten()])``, the output gather) and ``all_to_all_single``
  with split sizes (``ulysses_anything``);
* ``dist`` (``torch.distributed``) in ``attention_dispatch``, ``_modeling_parallel`` and
  ``hooks.context_parallel``: ``all_gather(list, tensor)`` of masks, of the per-rank sizes
  (``gather_size_by_comm``) and of ``_all_gather_anything``'s uneven output shards.

Inside an attention module a call goes to the hook, keyed by the module and by what it carries
(``<layer>:q|k|v|o|lse`` for the all-to-alls in order, ``<layer>:kv`` for the ring's K/V gather,
``<layer>:sizes``, ``<layer>:mask``; a repeat gets a number: ``:kv2``). Outside one (the model's
output gather and its sizes) it is exact: compact-hooks' plain all-gather, counted as ``exact``, not
in the hook's bytes (like :func:`~.parallel.parallelize`'s output gather). Any other collective of
these modules during the forward takes torch.distributed unchanged and is counted as ``unrouted``.

Uneven all-to-alls (split sizes) are padded: every chunk grows to the largest split with zero rows,
goes through the hook's equal all-to-all and is cut back. The largest split is the max of this
rank's input and output split sizes, which is the same on every rank when, as in diffusers, one side
of each all-to-all is the sizes of every rank. Uneven ``all_gather(list, tensor)`` (``_all_gather_anything``,
which gloo refuses) is padded the same way, flattened.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from compact_hooks.integrations.funcol import CollectiveProxy, RouteCounts

from compact_hooks.collectives import all_gather as plain_all_gather
from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.work import CollectiveWork, wait_on_use

A2A_ROLES = ("q", "k", "v", "o", "lse")
DIST_COLLECTIVES = frozenset({
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single", "all_reduce",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier", "_all_gather_base", "_reduce_scatter_base"})
FUNCOL_COLLECTIVES = frozenset({
    "all_gather_tensor", "all_gather_single", "all_gather_tensor_autograd", "all_gather_single_autograd",
    "all_gather_into_tensor_coalesced", "all_gather_single_coalesced", "all_to_all_single",
    "all_to_all_single_autograd", "all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced", "permute_tensor", "broadcast"})


class Router(RouteCounts):
    """Counters, keys and the routed collectives of one :class:`~.native.NativeHandle`."""

    def __init__(self, hook: CommHook) -> None:
        super().__init__(hook)
        self.layer: Optional[str] = None
        self.roles: Counter[str] = Counter()

    # -- keys and counters -------------------------------------------------------------------

    def enter(self, layer: str) -> None:
        self.layer, self.roles = layer, Counter()

    def leave(self) -> None:
        self.layer = None

    def key(self, kind: str) -> Optional[str]:
        """``<layer>:<role>`` for the next call of ``kind`` (``a2a``, ``kv``, ``sizes``, ``mask``)."""
        if self.layer is None:
            return None
        n = self.roles[kind]
        self.roles[kind] += 1
        if kind == "a2a":
            role = A2A_ROLES[n] if n < len(A2A_ROLES) else f"a2a{n}"
        else:
            role = kind if n == 0 else f"{kind}{n + 1}"
        return f"{self.layer}:{role}"

    # -- the collectives ------------------------------------------------------------------------

    def all_to_all(self, x: torch.Tensor, group: Any) -> torch.Tensor:
        """Equal all-to-all of ``x`` (dim 0 split over the group) through the hook."""
        self.counts["routed"] += 1
        return self.hook(CollectiveCall("all_to_all", x, group, key=self.key("a2a")))

    def all_to_all_split(self, x: torch.Tensor, output_split_sizes: Optional[Sequence[int]],
                         input_split_sizes: Optional[Sequence[int]], group: Any) -> torch.Tensor:
        """``funcol.all_to_all_single`` with split sizes, as a padded equal all-to-all through the hook."""
        size = dist.get_world_size(group)
        if output_split_sizes is None and input_split_sizes is None:
            return self.all_to_all(x, group)
        ins = list(input_split_sizes) if input_split_sizes is not None else [x.shape[0] // size] * size
        outs = list(output_split_sizes) if output_split_sizes is not None else [x.shape[0] // size] * size
        if len(ins) != size or len(outs) != size or sum(ins) != x.shape[0]:
            raise ValueError(f"all_to_all_single split sizes {ins} -> {outs} do not fit a group of {size} and "
                             f"{x.shape[0]} rows")
        m = max(ins + outs)
        rest = x.shape[1:]
        padded = x.new_zeros((size, m, *rest))
        for j, chunk in enumerate(x.split(ins)):
            padded[j, : chunk.shape[0]] = chunk
        out = self.all_to_all(padded.reshape(size * m, *rest), group).reshape(size, m, *rest)
        return torch.cat([out[j, :n] for j, n in enumerate(outs)])

    def all_gather(self, x: torch.Tensor, group: Any, dim: int, kind: str, lazy: bool = False) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``: the hook inside an attention, exact outside.

        ``lazy``: return an ``AsyncCollectiveTensor`` waited on at its first non-view use (as funcol's)."""
        key = self.key(kind)
        if key is None:
            self.counts["exact"] += 1
            return plain_all_gather(x, group, dim=dim, timeout_s=self.hook.timeout_s)
        self.counts["routed"] += 1
        work = self.hook.start(CollectiveCall("all_gather", x, group, key=key, dim=dim))
        if not lazy or work.is_completed():
            return work.wait()
        shape = list(x.shape)
        shape[dim] *= dist.get_world_size(group)
        return wait_on_use(work, shape, x)

    def all_gather_list(self, tensors: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
                        async_op: bool = False) -> Any:
        """``dist.all_gather(list, tensor, group)``, equal or uneven shapes (flattened and padded)."""
        kind = "mask" if tensor.is_floating_point() or tensor.dtype == torch.bool else "sizes"
        if all(t.shape == tensor.shape for t in tensors):
            gathered = self.all_gather(tensor.contiguous().unsqueeze(0), group, 0, kind)
            for t, g in zip(tensors, gathered):
                t.copy_(g)
        else:
            m = max(t.numel() for t in tensors)
            flat = tensor.new_zeros((1, m))
            flat[0, : tensor.numel()] = tensor.reshape(-1)
            gathered = self.all_gather(flat, group, 0, kind)
            for t, g in zip(tensors, gathered):
                t.copy_(g[: t.numel()].reshape(t.shape))
        return CollectiveWork.completed(tensor) if async_op else None

    # -- the stand-ins ----------------------------------------------------------------------------

    def a2a_function(self, previous: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def routed(x: torch.Tensor, group: Any) -> torch.Tensor:
            return self.all_to_all(x, group) if self.active else previous(x, group)

        return routed

    def funcol_proxy(self, real: Any) -> CollectiveProxy:
        def gather(x: torch.Tensor, gather_dim: int, group: Any, tag: str = "") -> torch.Tensor:
            if not self.active or not isinstance(group, dist.ProcessGroup):
                return self.unrouted("funcol.all_gather", real.all_gather_tensor)(x, gather_dim, group, tag)
            return self.all_gather(x.contiguous(), group, gather_dim, "kv", lazy=True)

        def a2a(x: torch.Tensor, output_split_sizes: Any, input_split_sizes: Any, group: Any,
                tag: str = "") -> torch.Tensor:
            if not self.active or not isinstance(group, dist.ProcessGroup):
                return self.unrouted("funcol.all_to_all_single", real.all_to_all_single)(
                    x, output_split_sizes, input_split_sizes, group, tag)
            return self.all_to_all_split(x.contiguous(), output_split_sizes, input_split_sizes, group)

        routes = {"all_gather_tensor": gather, "all_gather_single": gather, "all_to_all_single": a2a}
        return CollectiveProxy(real, routes, FUNCOL_COLLECTIVES, self, "funcol")

    def dist_proxy(self, real: Any) -> CollectiveProxy:
        def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
                       async_op: bool = False) -> Any:
            if not self.active or (group is not None and not isinstance(group, dist.ProcessGroup)):
                return self.unrouted("dist.all_gather", real.all_gather)(tensor_list, tensor, group, async_op)
            return self.all_gather_list(tensor_list, tensor, group if group is not None else dist.group.WORLD,
                                        async_op)

        return CollectiveProxy(real, {"all_gather": all_gather}, DIST_COLLECTIVES, self, "dist")

