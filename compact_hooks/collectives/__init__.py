"""Collectives on torch.distributed, one function per collective and layout; the group is explicit.

* :mod:`.plain`: the exact baseline (``all_gather``, ``all_to_all``, ``all_reduce``,
  ``ring_exchange``) and the definition of raw bytes (``plain_bytes``);
* :mod:`.compressed`: the same collectives moving codec payloads through a
  :class:`~compact_hooks.residual.Session`'s channels;
* :mod:`.protocol`: the settings handshake, header checks and base verification;
* :mod:`.transport`: waiting with a timeout, the byte-level exchanges and their ``start_*`` forms
  (a :class:`~.transport.Transfer` is one wire stage in flight).

Every plain and compressed collective has a ``start_*`` form returning a
:class:`~compact_hooks.work.CollectiveWork` (encode now, wire in flight, decode at ``wait()``).

A group of size 1 returns at once.
"""

from .compressed import (
    compressed_all_gather,
    compressed_all_reduce,
    compressed_all_to_all,
    compressed_ring_exchange,
    plain_is_cheaper,
    plain_recorded,
    reduce_chunks,
    start_compressed_all_gather,
    start_compressed_all_reduce,
    start_compressed_all_to_all,
    start_compressed_ring_exchange,
    start_plain_recorded,
)
from .plain import (
    all_gather,
    all_reduce,
    all_reduce_,
    all_to_all,
    check_rows,
    global_rank,
    group_rank,
    group_size,
    plain_bytes,
    ring_exchange,
    ring_ops,
    start_all_gather,
    start_all_reduce,
    start_all_reduce_,
    start_all_to_all,
    start_plain,
    start_ring_exchange,
)
from .protocol import (
    SETTINGS_NBYTES,
    agree_on_settings,
    agree_on_tensor,
    header_problem,
    maybe_verify,
    raise_if_any,
    verify_headers,
)
from .transport import (
    Group,
    Transfer,
    all_gather_bytes,
    all_to_all_bytes,
    device_of,
    exchange_ring,
    gather_texts,
    group_ranks,
    start_transfer,
    transport_timeout,
    wait,
)

__all__ = [
    "Group", "SETTINGS_NBYTES", "agree_on_settings", "agree_on_tensor", "all_gather", "all_gather_bytes",
    "all_reduce", "all_reduce_", "all_to_all", "all_to_all_bytes", "check_rows", "compressed_all_gather",
    "compressed_all_reduce", "compressed_all_to_all", "compressed_ring_exchange", "device_of", "exchange_ring", "gather_texts",
    "global_rank", "group_rank", "group_ranks", "group_size", "header_problem", "maybe_verify", "plain_bytes",
    "plain_is_cheaper", "plain_recorded", "raise_if_any", "reduce_chunks", "ring_exchange", "transport_timeout",
    "verify_headers", "wait", "Transfer", "ring_ops", "start_all_gather", "start_all_reduce", "start_all_reduce_",
    "start_all_to_all", "start_plain", "start_ring_exchange", "start_transfer", "start_compressed_all_gather",
    "start_compressed_all_reduce", "start_compressed_all_to_all", "start_compressed_ring_exchange",
    "start_plain_recorded",
]
