"""Route the collectives of yunchang (xDiT's USP attention) through a CommHook, on unforked yunchang.

yunchang's ``LongContextAttention`` / ``LongContextAttentionQKVPacked`` / ``UlyssesAttention`` move
data in two places, both through the module name ``dist`` of their own module:

* Ulysses: ``yunchang.comm.all_to_all.all_to_all_4D`` / ``all_to_all_5D`` lay the tensor out as
  ``[P, ...]`` (chunk ``j`` for rank ``j``) and call ``dist.all_to_all_single``: the hook's
  ``all_to_all``;
* ring: ``yunchang.ring.utils.RingComm`` queues ``dist.P2POp`` pairs (send to the next rank, receive
  from the previous one in the ring group) and runs them with ``dist.batch_isend_irecv``: the hook's
  ``ring_exchange``, one per queued pair, started asynchronously (``hook.start``); the requests it
  returns complete when the exchange was decoded, so yunchang's ring keeps computing the current
  block while the next one moves (its own one-hop-ahead overlap).

:class:`YunchangHooks` replaces ``dist`` in those two modules by a stand-in whose
``all_to_all_single`` and ``batch_isend_irecv`` go through the hook (everything else is
torch.distributed itself), from the first ``with`` block until the outermost one is left (blocks
nest and may be entered from several threads) or until :meth:`remove`. yunchang's own layout code,
ring loop and softmax merging run unchanged. :meth:`attach` keys the calls of one attention module,
independently of the ``with`` blocks (until :meth:`detach`): ``"<key>:q|k|v|o"`` (packed:
``":qkv"``, ``":o"``) and ``"<key>:ring_k.hopN"`` / ``":ring_v.hopN"``; calls outside an attached
module get ``key=None`` (the hook's per-step counter). The key in force is the calling thread's.
Because the ``dist`` name is process-wide, one instance routes yunchang at a time: entering a second
while the first is routed raises ``RuntimeError`` and changes nothing.

Not routed (documented gaps): ``AsyncLongContextAttention`` (its all-to-alls run on CUDA streams in
``yunchang.hybrid.async_attn_layer``, one per head group, with async handles) and the backward
passes' gradient ring (``d_kv_comm``), which a forward-only inference hook has no business
compressing. A P2P batch that is not a ring step (a send that does not go to the next rank) takes
torch.distributed unchanged and is counted in ``unrouted``. The packed layouts
(``LongContextAttentionQKVPacked``, ``use_pack_qkv=True``) are routed the same way but fail inside
yunchang 0.6.4 itself (a missing ``attn_processor`` argument; a ``.continous()`` typo), so they are
untested.

On CPU, yunchang's pure-torch attention (``AttnType.TORCH_FLASH`` / ``ring_impl_type="basic_pytorch"``)
calls ``aten::_scaled_dot_product_flash_attention``, which torch implements for CUDA only;
:func:`cpu_flash_attention` registers a CPU kernel for it that calls torch's own
``_scaled_dot_product_flash_attention_for_cpu`` (same output and log-sum-exp).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from compact_hooks.hook import CollectiveCall, CommHook
from compact_hooks.hooks import PassthroughHook
from compact_hooks.work import CollectiveWork

__all__ = ["YunchangHooks", "cpu_flash_attention", "hook_yunchang"]

CALL_NAMES = ("q", "k", "v", "o")
PACKED_NAMES = ("qkv", "o")
RING_NAMES = {1: ("ring_kv",), 2: ("ring_k", "ring_v")}


def _yunchang_modules() -> tuple[Any, Any]:
    try:
        import yunchang.comm.all_to_all as a2a
        import yunchang.ring.utils as ring_utils
    except ImportError as exc:
        raise ImportError(
            "compact_hooks.integrations.yunchang needs yunchang: pip install 'compact-hooks[xdit]'"
        ) from exc
    return a2a, ring_utils


@dataclass
class _Site:
    """The attention call in progress: its key and how many collectives it made so far."""

    key: str
    names: tuple[str, ...]
    a2a: int = 0
    hops: int = 0


class _RingRequest:
    """What the routed ``batch_isend_irecv`` returns for one send/receive pair (the same object for
    both ops): the hook's work in flight. ``wait()`` waits for it (the compressed exchange decoded) and
    copies the result into yunchang's receive buffer, once; yunchang computes on the current block
    between ``commit()`` and ``wait()``, so its one-hop-ahead overlap is kept."""

    def __init__(self, work: CollectiveWork, recv: torch.Tensor) -> None:
        self.work, self.recv = work, recv
        self.done = False

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        if not self.done:
            self.done = True
            self.recv.copy_(self.work.wait())
        return True

    def is_completed(self) -> bool:
        return self.done or self.work.is_completed()


class _HookedDist:
    """Stands in for ``torch.distributed`` inside yunchang's comm modules."""

    def __init__(self, owner: "YunchangHooks") -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: Any = None,
                          input_split_sizes: Any = None, group: Any = None, async_op: bool = False) -> Any:
        if output_split_sizes is not None or input_split_sizes is not None or async_op:
            self._owner._count_unrouted()
            return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group, async_op)
        output.copy_(self._owner._all_to_all(input, group).view_as(output))
        return None

    def batch_isend_irecv(self, p2p_op_list: list) -> list:
        return self._owner._ring(p2p_op_list)


class _Keyed:
    """The ``forward`` of an attached module: opens a site under each attaching instance's key (held
    weakly, so a dropped instance lets go), then runs the module's own forward."""

    def __init__(self, original: Any, had_own: bool) -> None:
        self.original = original
        self.had_own = had_own
        self.lock = threading.Lock()
        self.keys: "weakref.WeakKeyDictionary[YunchangHooks, tuple[str, tuple[str, ...]]]" = \
            weakref.WeakKeyDictionary()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            owners = list(self.keys.items())
        with contextlib.ExitStack() as sites:
            for owner, (key, names) in owners:
                sites.enter_context(owner._site_open(_Site(key, names)))
            return self.original(*args, **kwargs)


def _peer(op: Any) -> Optional[int]:
    """The global rank a P2POp talks to."""
    peer = getattr(op, "peer", None)
    if peer is None and getattr(op, "group_peer", None) is not None:
        peer = dist.get_global_rank(op.group, op.group_peer) if op.group is not None else op.group_peer
    return peer


class YunchangHooks:
    """yunchang's all-to-alls and ring P2P through ``hook`` while routed (see the module docstring).

    Routing and keys are separate: ``with`` blocks (re-entrant, from any thread) route yunchang
    through the hook until the outermost one is left; :meth:`attach` keys a module's calls until
    :meth:`detach` or :meth:`remove`, across any number of ``with`` blocks. The key of a call is the
    calling thread's, so threads may forward through one instance at once. Only one instance can
    route yunchang at a time (its module ``dist`` is process-wide): entering a second raises.
    """

    def __init__(self, hook: Optional[CommHook] = None) -> None:
        self.hook = hook if hook is not None else PassthroughHook()
        self.unrouted = 0  # collectives that took torch.distributed unchanged
        self._lock = threading.Lock()  # the routing state and the counter below
        self._depth = 0  # open with blocks, all threads together
        self._saved: list[tuple[Any, Any]] = []  # (yunchang module, its dist) while routed
        self._local = threading.local()  # .sites: this thread's open attention calls, innermost last
        self._attached: dict[int, nn.Module] = {}

    # -- routing ---------------------------------------------------------------------------------

    def install(self) -> "YunchangHooks":
        """Route yunchang's collectives through the hook until :meth:`remove` or the end of the
        outermost ``with`` (idempotent)."""
        with self._lock:
            self._route()
        return self

    def _route(self) -> None:
        if self._saved:
            return
        modules = _yunchang_modules()
        for module in modules:
            if isinstance(module.dist, _HookedDist):
                raise RuntimeError(
                    f"{module.__name__} is already routed through another YunchangHooks: yunchang's "
                    f"dist is process-wide, so only one instance can route it at a time. Use one "
                    f"instance for every attention module (attach() each to it, any thread may enter "
                    f"its with), or leave the other instance's with block (or call its remove()) first")
        proxy = _HookedDist(self)  # made per routing: an unrouted instance holds no cycle to itself
        for module in modules:
            self._saved.append((module, module.dist))
            module.dist = proxy

    def _unroute(self) -> None:
        for module, original in reversed(self._saved):
            if isinstance(module.dist, _HookedDist) and module.dist._owner is self:
                module.dist = original
        self._saved = []

    @property
    def routed(self) -> bool:
        """Whether yunchang's collectives go through this instance's hook now."""
        return bool(self._saved)

    def __enter__(self) -> "YunchangHooks":
        with self._lock:
            self._route()
            self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._unroute()

    # -- keys ------------------------------------------------------------------------------------

    def attach(self, attention: nn.Module, key: str) -> nn.Module:
        """Key the collectives of ``attention`` (a yunchang attention module) by ``key`` until
        :meth:`detach` (attaching it again changes the key); returns it."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"attach() needs a non-empty str key such as 'blocks.0.attn'; got {key!r}")
        packed = type(attention).__name__.endswith("QKVPacked") or bool(getattr(attention, "use_pack_qkv", False))
        keyed = vars(attention).get("forward")
        if not isinstance(keyed, _Keyed):
            keyed = _Keyed(attention.forward, "forward" in vars(attention))
            attention.forward = keyed  # type: ignore[method-assign]
        with keyed.lock:
            keyed.keys[self] = (key, PACKED_NAMES if packed else CALL_NAMES)
        self._attached[id(attention)] = attention
        return attention

    def detach(self, attention: Optional[nn.Module] = None) -> None:
        """Stop keying ``attention`` (every attached module if ``None``); a module no instance keys
        gets its own forward back. Routing is unchanged."""
        targets = list(self._attached.values()) if attention is None else [attention]
        for module in targets:
            self._attached.pop(id(module), None)
            keyed = vars(module).get("forward")
            if not isinstance(keyed, _Keyed):
                continue
            with keyed.lock:
                keyed.keys.pop(self, None)
                if len(keyed.keys):
                    continue
            if keyed.had_own:
                module.forward = keyed.original  # type: ignore[method-assign]
            else:
                vars(module).pop("forward", None)

    def remove(self) -> None:
        """Put torch.distributed back into yunchang's modules (whatever ``with`` blocks are open) and
        detach every attached module (idempotent)."""
        with self._lock:
            self._depth = 0
            self._unroute()
        self.detach()

    @contextlib.contextmanager
    def _site_open(self, site: _Site) -> Iterator[None]:
        sites = self._sites()
        sites.append(site)
        try:
            yield
        finally:
            sites.pop()

    def _sites(self) -> list[_Site]:
        sites = getattr(self._local, "sites", None)
        if sites is None:
            sites = self._local.sites = []
        return sites

    def _count_unrouted(self) -> None:
        with self._lock:
            self.unrouted += 1

    # -- the routed collectives ------------------------------------------------------------------

    def _site(self) -> Optional[_Site]:
        """The calling thread's innermost attached call, if any."""
        sites = self._sites()
        return sites[-1] if sites else None

    def _key(self, name_of: Any) -> Optional[str]:
        site = self._site()
        return None if site is None else f"{site.key}:{name_of(site)}"

    def _all_to_all(self, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        def name(site: _Site) -> str:
            i, site.a2a = site.a2a, site.a2a + 1
            return site.names[i] if i < len(site.names) else f"a2a{i}"

        return self.hook(CollectiveCall("all_to_all", tensor, group, key=self._key(name)))

    def _ring_pairs(self, ops: list) -> Optional[list[tuple[Any, Any]]]:
        """``[(send, recv), ...]`` if ``ops`` is one ring step (send next, receive previous), else None."""
        if not ops or len(ops) % 2:
            return None
        group = ops[0].group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            return None
        nxt = dist.get_global_rank(group, (rank + 1) % size) if group is not None else (rank + 1) % size
        prv = dist.get_global_rank(group, (rank - 1) % size) if group is not None else (rank - 1) % size
        pairs = list(zip(ops[0::2], ops[1::2]))
        for send, recv in pairs:
            if (send.op is not dist.isend or recv.op is not dist.irecv or send.group is not group
                    or recv.group is not group or _peer(send) != nxt or _peer(recv) != prv
                    or send.tensor.shape != recv.tensor.shape or send.tensor.dtype != recv.tensor.dtype):
                return None
        return pairs

    def _ring(self, ops: list) -> list:
        pairs = self._ring_pairs(ops)
        if pairs is None:
            self._count_unrouted()
            return dist.batch_isend_irecv(ops)
        names = RING_NAMES.get(len(pairs), tuple(f"ring{i}" for i in range(len(pairs))))
        site = self._site()
        if site is not None:
            site.hops += 1
        requests = []
        for (send, recv), name in zip(pairs, names):
            key = None if site is None else f"{site.key}:{name}.hop{site.hops}"
            request = _RingRequest(self.hook.start(CollectiveCall("ring_exchange", send.tensor, send.group, key=key)),
                                   recv.tensor)
            requests += [request, request]
        return requests


def hook_yunchang(hook: Optional[CommHook] = None, attention: Optional[nn.Module] = None,
                  key: str = "attn") -> YunchangHooks:
    """Install a :class:`YunchangHooks` for ``hook`` (and attach ``attention`` under ``key``); use it as a
    context manager (leaving it un-routes yunchang) or call ``remove()`` (also detaches)."""
    hooks = YunchangHooks(hook).install()
    if attention is not None:
        hooks.attach(attention, key)
    return hooks


def _flash_for_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                   is_causal: bool = False, return_debug_mask: bool = False, *, scale: Optional[float] = None
                   ) -> tuple:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                           scale=scale)
    empty = torch.empty(0, dtype=torch.int64)
    return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, torch.empty(0, dtype=query.dtype)


def _has_cpu_flash() -> bool:
    x = torch.zeros(1, 1, 1, 8)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention(x, x, x)
    except (NotImplementedError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def cpu_flash_attention() -> Iterator[bool]:
    """While open, ``aten::_scaled_dot_product_flash_attention`` runs on CPU tensors (yunchang's
    pure-torch path) through torch's CPU flash kernel; yields whether a kernel had to be registered."""
    if _has_cpu_flash():
        yield False
        return
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("_scaled_dot_product_flash_attention", _flash_for_cpu, "CPU")
        yield True
    finally:
        lib._destroy()
