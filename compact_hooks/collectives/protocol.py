"""Agreement between ranks: the settings handshake, first-exchange header checks and the
periodic base checksums. Each raises or repairs before a mismatch can corrupt a result."""

from __future__ import annotations

import json
from typing import Any, Optional

import torch

from ..errors import ProtocolError
from ..residual import Session
from ..wire import HEADER_NBYTES, WIRE_VERSION, parse_header
from .plain import group_rank, group_size
from .transport import Group, all_gather_into, gather_texts, group_ranks

SETTINGS_NBYTES = 1024


def header_problem(payloads: torch.Tensor, session: Session, key: str, dtype: Optional[torch.dtype] = None,
                   numel: Optional[int] = None) -> str:
    """What is wrong with received payloads (``[n, nbytes]``) of a full send, or ``""``: magic,
    version, codec fingerprint, and (when given) dtype and element count (a peer's float16
    tensor must not decode as bfloat16)."""
    headers = payloads.reshape(payloads.shape[0], -1)[:, :HEADER_NBYTES].cpu()  # one host copy for all rows
    codec = session.full_codec  # headers are checked on full sends
    for row in headers:
        try:
            header = parse_header(row)
        except ProtocolError as exc:
            return f"a peer sent a payload of {key!r} that is not compact-hooks wire data ({exc})"
        if header.version != WIRE_VERSION or header.fingerprint != codec.fingerprint:
            return (f"ranks disagree on the wire format of {key!r}: a rank uses wire v{WIRE_VERSION} with "
                    f"{codec.spec()} (fingerprint {codec.fingerprint:#010x}); a peer sent "
                    f"wire v{header.version} with fingerprint {header.fingerprint:#010x}. Give every rank the same "
                    "\"compact_hooks\" config and compact-hooks version.")
        if (dtype is not None and header.dtype != dtype) or (numel is not None and header.numel != numel % 2**32):
            return (f"ranks disagree on the tensor of {key!r}: a rank has {dtype} with {numel} elements, a peer sent "
                    f"{header.dtype} with {header.numel} elements. Every rank must pass the same dtype and shape to "
                    "this collective.")
    return ""


def verify_headers(payloads: torch.Tensor, session: Session, key: str, group: Group,
                   dtype: Optional[torch.dtype] = None, numel: Optional[int] = None) -> None:
    """Check the received payloads of a key's first full send (see :func:`header_problem`), once
    per key and group. The verdict is shared: when any rank finds a problem, every rank of the
    group raises the same :class:`ProtocolError` (none is left waiting in the next collective)."""
    ranks = group_ranks(group)
    if (ranks, key) in session.verified_headers:
        return
    raise_if_any(header_problem(payloads, session, key, dtype, numel), group, session.timeout_s,
                 f"the header check of {key!r}")
    session.verified_headers.add((ranks, key))


VERDICT_NBYTES = 1024


def raise_if_any(problem: str, group: Group, timeout_s: Optional[float], what: str) -> None:
    """Share each rank's ``problem`` text (empty: none) with the group; if any rank has one, every
    rank raises :class:`ProtocolError` with the first such rank's text."""
    texts = gather_texts(problem.encode(), VERDICT_NBYTES, group, timeout_s, what)
    ranks = group_ranks(group)
    for j, text in enumerate(texts):
        if text:
            raise ProtocolError(f"rank {ranks[j]} found: {text}")


TENSOR_NBYTES = 256


def agree_on_tensor(session: Session, group: Group, key: str, op: str, tensor: torch.Tensor) -> None:
    """Before a key's first collective in a group (and after its shape or dtype changes): every
    rank shares the op, shape and dtype it passes, and every rank raises :class:`ProtocolError`
    naming both sides when they differ (gloo would otherwise abort the process or hang)."""
    ranks = group_ranks(group)
    mine = (op, tuple(tensor.shape), tensor.dtype)
    if session.agreed_tensors.get((ranks, key)) == mine:
        return
    dtype = str(tensor.dtype).removeprefix("torch.")
    text = f"{op} of a {dtype} tensor of shape {list(tensor.shape)}".encode()
    texts = gather_texts(text, TENSOR_NBYTES, group, session.timeout_s, f"the tensor check of {key!r}")
    me = group_rank(group)
    for j, other in enumerate(texts):
        if other != texts[me]:
            raise ProtocolError(
                f"ranks of the group {list(ranks)} call {key!r} differently: rank {ranks[me]} calls "
                f"{texts[me]} but rank {ranks[j]} calls {other}. Every rank must call the same collective with the "
                "same shape and dtype at this call site."
            )
    session.agreed_tensors[(ranks, key)] = mine


def agree_on_settings(session: Session, group: Group, extra: Optional[dict[str, Any]] = None) -> None:
    """Once per group: gather every rank's settings (plus ``extra``, e.g. the hook's compressed
    ops) and raise :class:`ProtocolError` naming both sides when they differ (a different
    compressor, parameter, residual mode or wire version)."""
    size = group_size(group)
    if size == 1:
        return
    ranks = group_ranks(group)
    if ranks in session.checked_groups:
        return
    mine = json.dumps({"wire": WIRE_VERSION, **session.settings(), **(extra or {})}, sort_keys=True).encode()
    texts = gather_texts(mine, SETTINGS_NBYTES, group, session.timeout_s, "the settings handshake")
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


def maybe_verify(session: Session, key: str, group: Group) -> None:
    """Every ``verify_every`` exchanges of ``key`` (a stream name of ``Session.stream``, so one
    group's streams only): gather a checksum of every base of the key from every rank; where two
    copies of a stream differ, every rank of the group schedules a full send of the key."""
    state = session.keys.get(key)
    if (not session.verify_every or state is None or session.mode == "none"
            or state.exchanges % session.verify_every):
        return
    size = group_size(group)
    ranks = group_ranks(group)
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
        session.resync_stream(key)
        session.stats.warn(f"step {session.step}: bases of {key!r} diverged on streams {', '.join(streams)}; "
                           "resynchronised with a full send")
