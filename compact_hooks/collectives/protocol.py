"""Agreement between ranks: the settings handshake, first-exchange header checks and the
periodic base checksums. Each raises or repairs before a mismatch can corrupt a result."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import ProtocolError
from ..residual import Session
from ..wire import HEADER_NBYTES, WIRE_VERSION, parse_header
from .plain import group_rank, group_size
from .transport import Group, all_gather_bytes, all_gather_into

SETTINGS_NBYTES = 1024


def verify_headers(payloads: torch.Tensor, session: Session, key: str, group: Group,
                   dtype: Optional[torch.dtype] = None, numel: Optional[int] = None) -> None:
    """Check magic, version, compressor fingerprint and (when given) the dtype and element count of
    received payloads (``[n, nbytes]``): a peer's float16 tensor must not decode as bfloat16."""
    headers = payloads.reshape(payloads.shape[0], -1)[:, :HEADER_NBYTES].cpu()  # one host copy for all rows
    for row in headers:
        header = parse_header(row)
        codec = session.warmup_compressor or session.compressor  # first exchanges are full sends
        if header.version != WIRE_VERSION or header.fingerprint != codec.fingerprint:
            raise ProtocolError(
                f"ranks disagree on the wire format of {key!r}: this rank uses wire v{WIRE_VERSION} with "
                f"{codec.spec()} (fingerprint {codec.fingerprint:#010x}); a peer sent "
                f"wire v{header.version} with fingerprint {header.fingerprint:#010x}. Give every rank the same "
                "\"compact_hooks\" config and compact-hooks version."
            )
        if (dtype is not None and header.dtype != dtype) or (numel is not None and header.numel != numel % 2**32):
            raise ProtocolError(
                f"ranks disagree on the tensor of {key!r}: this rank has {dtype} with {numel} elements, a peer sent "
                f"{header.dtype} with {header.numel} elements. Every rank must pass the same dtype and shape to "
                "this collective."
            )


def agree_on_settings(session: Session, group: Group, extra: Optional[dict[str, Any]] = None) -> None:
    """Once per group: gather every rank's settings (plus ``extra``, e.g. the hook's compressed
    ops) and raise :class:`ProtocolError` naming both sides when they differ (a different
    compressor, parameter, residual mode or wire version)."""
    size = group_size(group)
    if size == 1:
        return
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(size))
    if ranks in session.checked_groups:
        return
    mine = json.dumps({"wire": WIRE_VERSION, **session.settings(), **(extra or {})}, sort_keys=True).encode()
    if len(mine) > SETTINGS_NBYTES:  # long rules: a digest of the whole text still tells any difference
        digest = hashlib.sha1(mine).hexdigest().encode()
        mine = mine[: SETTINGS_NBYTES - 64] + b"...(truncated; sha1 " + digest + b")"
    buf = torch.zeros(SETTINGS_NBYTES, dtype=torch.uint8)
    buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    gathered = all_gather_bytes(buf.to(device_of(group)), group, session.timeout_s, "the settings handshake").cpu()
    texts = [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in gathered]
    me = group_rank(group)
    for j, text in enumerate(texts):
        if text != texts[me]:
            raise ProtocolError(
                f"ranks of the group {list(ranks)} disagree on compact-hooks settings{_differing(texts[me], text)}: "
                f"rank {ranks[me]} has "
                f"{texts[me]} but rank {ranks[j]} has {text}. Give every rank the same \"compact_hooks\" "
                "config and compact-hooks version."
            )
    session.checked_groups.add(ranks)


def _differing(mine: str, theirs: str) -> str:
    """`` (they differ in: a, b)`` from two settings texts (empty if either is truncated)."""
    try:
        a, b = json.loads(mine), json.loads(theirs)
    except ValueError:
        return ""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f" (they differ in: {', '.join(keys)})" if keys else ""


def device_of(group: Group) -> torch.device:
    """The device a group's collectives run on (CUDA for nccl, else the CPU)."""
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def maybe_verify(session: Session, key: str, group: Group) -> None:
    """Every ``verify_every`` exchanges of ``key``: gather a checksum of every base of the key from
    every rank; where two copies of a stream differ, every rank schedules a full send of the key."""
    state = session.keys.get(key)
    if (not session.verify_every or state is None or session.mode == "none"
            or state.exchanges % session.verify_every):
        return
    size = group_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    index = {g: i for i, g in enumerate(ranks)}
    device = next((ch.base.device for ch in state.channels.values() if ch.base is not None), torch.device("cpu"))
    table = torch.zeros((size, size + 1, 2), dtype=torch.int64, device=device)
    for (src, dst), channel in state.channels.items():
        if channel.base is not None:
            j = size if dst is None else index[dst]
            table[index[src], j, 0] = channel.checksum()
            table[index[src], j, 1] = 1
    gathered = torch.empty((size, *table.shape), dtype=table.dtype, device=device)
    all_gather_into(gathered.view(-1), table.view(-1), group, session.timeout_s, f"base verification of {key!r}")
    values, held = gathered[..., 0], gathered[..., 1].bool()
    lo = torch.where(held, values, torch.iinfo(torch.int64).max).amin(0)
    hi = torch.where(held, values, torch.iinfo(torch.int64).min).amax(0)
    mismatch = (held.sum(0) > 1) & (lo != hi)
    if bool(mismatch.any()):
        streams = [f"{ranks[i]}->{'*' if j == size else ranks[j]}" for i, j in mismatch.nonzero().tolist()]
        session.request_resync(key)
        session.stats.warn(f"step {session.step}: bases of {key!r} diverged on streams {', '.join(streams)}; "
                           "resynchronised with a full send")
