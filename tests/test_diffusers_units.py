"""Single-process checks of the diffusers integration: layouts, padding, online softmax, tracking, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from compact_hooks.integrations.diffusers import attention as A  # noqa: E402
from compact_hooks.integrations.diffusers import parallelize, resolve_hook  # noqa: E402
from compact_hooks.integrations.diffusers.common import StepTracker  # noqa: E402
from compact_hooks.integrations.diffusers.sharding import pad_tokens  # noqa: E402
from compact_hooks.integrations.diffusers.tiny import tiny_flux, tiny_inputs  # noqa: E402

import compact_hooks as ch  # noqa: E402


def test_segment_shards_and_padding():
    seg = A.Segment(length=10, world=4)
    assert seg.local == 3 and seg.padded
    assert [seg.valid_count(r) for r in range(4)] == [3, 3, 3, 1]
    layout = A.SequenceLayout((A.Segment(5, 2), A.Segment(4, 2)))
    assert layout.local == 5 and layout.rank_valid_count(1) == 4
    assert layout.global_valid(2, torch.device("cpu")).tolist() == [True] * 5 + [True, True, False, True, True]
    assert A.SequenceLayout((A.Segment(4, 2),)).global_valid(2, torch.device("cpu")) is None


def test_pad_tokens_repeats_last():
    x = torch.arange(6.0).view(1, 3, 2)
    y = pad_tokens(x, 1, 5)
    assert y.shape == (1, 5, 2) and torch.equal(y[:, 3:], x[:, 2:].expand(1, 2, 2))


def test_online_softmax_merge_matches_full_attention_with_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g) for _ in range(3))
    valid = torch.tensor([True, True, True, False, True, True, False])
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, valid].transpose(1, 2),
                                          v[:, valid].transpose(1, 2)).transpose(1, 2)
    acc = None
    for lo, hi in ((0, 3), (3, 4), (4, 7)):  # the middle block is all padding: skipped like the ring does
        if valid[lo:hi].any():
            acc = A._merge(acc, A._block_attention(q, k[:, lo:hi], v[:, lo:hi], 8 ** -0.5, valid[lo:hi]))
    assert torch.allclose(acc[0].transpose(1, 2), full, atol=1e-6)


def test_single_rank_padded_layout_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g) for _ in range(3))
    comm = A.AttentionComm(ch.PassthroughHook(), None, 1, 0, "ulysses")
    layout = A.SequenceLayout((A.Segment(6, 1),))
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert torch.allclose(A.sequence_parallel_attention(q, k, v, comm, "x", layout), ref, atol=1e-6)


def test_heads_check_message():
    with pytest.raises(ValueError, match="divisible by the group size"):
        A.check_heads(6, 4, "blocks.0.attn")


class CountingHook(ch.PassthroughHook):
    def __init__(self) -> None:
        self.requests = 0
        self.steps = 0

    def begin_request(self) -> None:
        self.requests += 1

    def next_step(self) -> None:
        self.steps += 1


def test_step_tracker_detects_requests_from_timesteps():
    hook = CountingHook()
    tracker = StepTracker(hook)
    for t in (1.0, 0.7, 0.7, 0.3, 1.0, 0.5):  # two requests; equal timesteps (CFG passes) stay in one
        tracker.before_forward(torch.tensor([t]))
        tracker.after_forward()
    assert hook.requests == 2 and hook.steps == 6


def test_single_process_parallelize_is_identity_and_tracks_steps():
    model = tiny_flux()
    inp = tiny_inputs("flux", model, height=3, width=3)
    with torch.no_grad():
        ref = model(**inp)[0]
    hook = CountingHook()
    with parallelize(model, None, mode="ring", hook=hook) as handle:
        with torch.no_grad():
            y = model(**inp)[0]
            model(**{**inp, "timestep": inp["timestep"] * 0.5})
        assert "ring" in repr(handle)
    assert torch.allclose(y, ref, atol=1e-6)
    assert hook.requests == 1 and hook.steps == 2


def test_user_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        parallelize(tiny_flux(), None, mode="tree")
    with pytest.raises(TypeError, match="supports"):
        parallelize(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="hook must be"):
        resolve_hook(3)
    assert isinstance(resolve_hook({"compact_hooks": {"compressor": "int2"}}), ch.CompactHook)
    assert isinstance(resolve_hook(None), ch.PassthroughHook)


def test_missing_diffusers_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "compact_hooks.integrations.diffusers", raising=False)
    with pytest.raises(ImportError, match=r"compact-hooks\[diffusers\]"):
        importlib.import_module("compact_hooks.integrations.diffusers")
