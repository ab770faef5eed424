"""Channels and sessions in one process: error feedback keeps the error bounded, delta drifts,
sender and receiver bases stay bit-identical, and session bookkeeping behaves."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks.residual import Channel, Session


def int8_delta(group_size: int) -> float:
    """Worst-case relative error of symmetric absmax int8 group quantization: every element of a
    group is off by at most half a step, absmax/(2*127), and the group's norm is at least absmax,
    so ||r - Q(r)|| <= sqrt(g)/(2*127) * ||r|| per group, hence overall (fp16 scale rounding adds
    a factor 1 + 2**-10)."""
    return math.sqrt(group_size) / 254 * (1 + 2**-10)


def walk(seed: int, steps: int, shape: tuple[int, int], step_norm: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    out = [x]
    for _ in range(steps):
        d = torch.randn(shape, generator=g)
        d = d * (step_norm * float(torch.rand((), generator=g)) / d.norm())
        x = x + d
        out.append(x)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(5, 60), rows=st.integers(1, 16),
       groups=st.integers(1, 3), step_norm=st.floats(0.01, 10.0), codec=st.sampled_from(["int8", "fp16"]))
def test_error_feedback_drift_is_bounded(seed, steps, rows, groups, step_norm, codec):
    """Bound proved: let e_t = x_t - base_t and delta the codec's worst-case relative error
    (||r - D(E(r))|| <= delta ||r||; delta < 1). EF sends r_t = x_t - base_{t-1} = (x_t - x_{t-1}) + e_{t-1}
    and sets base_t = base_{t-1} + D(E(r_t)), so e_t = r_t - D(E(r_t)) and
    ||e_t|| <= delta (Delta + ||e_{t-1}||). With e_0 = 0 (the warm-up full send) this gives
    ||e_t|| <= delta Delta / (1 - delta) for every t: a bound that does not grow with T.
    (Plus float32 rounding of the base, at most a few ulps of ||x_t||.)"""
    shape = (rows, 128 * groups)
    delta = int8_delta(128) if codec == "int8" else 2.0**-11
    bound = delta * step_norm / (1 - delta)
    channel = Channel(ch.build_compressor(codec), "ef", torch.float32)
    for t, x in enumerate(walk(seed, steps, shape, step_norm)):
        _, recon = channel.encode(x, full=(t == 0))
        err = float((x - recon).norm())
        assert err <= bound + 1e-5 * float(x.norm()), (t, err, bound)


def test_delta_drifts_while_ef_stays_bounded():
    """A constant step whose quantization error has the same sign every time: without error
    feedback it accumulates linearly; with it, it stays at one step's error."""
    group = torch.full((128,), 0.3)
    group[0] = 1.0
    step = group.repeat(4, 1)  # every element except the max rounds the same way each step
    codec = ch.build_compressor("int4")
    errors = {}
    for mode in ["delta", "ef"]:
        channel = Channel(codec, mode, torch.float32)
        x = torch.zeros_like(step)
        errs = []
        for t in range(40):
            _, recon = channel.encode(x, full=(t == 0))
            errs.append(float((x - recon).norm()))
            x = x + step
        errors[mode] = errs
    assert errors["delta"][-1] > 10 * errors["delta"][2] > 0
    assert max(errors["ef"]) < 2 * max(errors["ef"][1:4]) + 1e-6
    assert errors["delta"][-1] > 20 * errors["ef"][-1]


@pytest.mark.parametrize("mode", ["none", "delta", "ef", "ef2"])
@pytest.mark.parametrize("base_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sender_and_receiver_bases_bit_identical(mode, base_dtype, dtype):
    codec = ch.build_compressor("int2")
    sender, receiver = Channel(codec, mode, base_dtype), Channel(codec, mode, base_dtype)
    torch.manual_seed(0)
    x = torch.randn(6, 256).to(dtype)
    for t in range(8):
        x = (x.float() + 0.1 * torch.randn(6, 256)).to(dtype)
        full = t == 0
        payload, recon_sender = sender.encode(x, full)
        recon_receiver = receiver.decode(payload, tuple(x.shape), x.dtype, full)
        assert torch.equal(recon_sender, recon_receiver)
        assert recon_receiver.dtype == dtype and recon_receiver.shape == x.shape
        if mode != "none":
            assert sender.digest() == receiver.digest()


def test_nonfinite_never_enters_the_base():
    codec = ch.build_compressor("int8")
    sender, receiver = Channel(codec, "ef", None), Channel(codec, "ef", None)
    x = torch.randn(4, 128)
    receiver.decode(sender.encode(x, True)[0], (4, 128), x.dtype, True)
    bad = x.clone()
    bad[1, 5] = float("nan")
    payload, recon = sender.encode(bad, False)
    out = receiver.decode(payload, (4, 128), x.dtype, False)
    assert torch.isnan(out).all() and torch.isnan(recon).all()  # the user's NaN stays visible
    assert torch.isfinite(sender.base).all() and torch.isfinite(receiver.base).all()
    assert sender.digest() == receiver.digest()
    payload, recon = sender.encode(x, False)
    out = receiver.decode(payload, (4, 128), x.dtype, False)
    assert torch.isfinite(out).all() and float((out - x).norm() / x.norm()) < 0.05
    assert int(receiver.nonfinite) > 0


def test_session_warmup_reset_and_keys():
    session = Session(ch.build_compressor("int2"), "ef", warmup_steps=2)
    shape, dtype = (4, 128), torch.float32
    assert [session.prepare("k", shape, dtype) for _ in range(4)] == [True, True, False, False]
    assert session.prepare("k", (8, 128), dtype) is True  # new shape resets the key
    assert session.prepare("k", (8, 128), torch.float16) is True  # so does a new dtype
    session.channel("k", 0).encode(torch.randn(8, 128, dtype=torch.float16), True)
    assert session.memory_bytes() == 8 * 128 * 2
    session.request_resync("k")
    assert session.prepare("k", (8, 128), torch.float16) is True
    assert session.auto_key("all_gather") == "all_gather#0" and session.auto_key("all_gather") == "all_gather#1"
    session.next_step()
    assert session.auto_key("all_gather") == "all_gather#0" and session.step == 1
    session.begin_request()
    assert session.keys == {} and session.step == 0 and session.memory_bytes() == 0
    assert session.prepare("k", shape, dtype) is True


def test_session_base_dtype_option():
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("input", torch.float16)]:
        session = Session(ch.build_compressor("int4"), "ef", 1, name)
        session.prepare("k", (2, 128), torch.float16)
        session.channel("k", 0).encode(torch.randn(2, 128, dtype=torch.float16), True)
        assert session.channel("k", 0).base.dtype == dtype
    with pytest.raises(ValueError, match="base_dtype"):
        Session(ch.build_compressor("int4"), "ef", 1, "int4")  # int8 / fp8 are valid since issue 23
    with pytest.raises(ValueError, match="residual mode"):
        Session(ch.build_compressor("int4"), "ef3")


def test_hook_on_single_rank_group_returns_input():
    hook = ch.CompactHook({"compressor": "int2"})
    x = torch.randn(3, 4)
    for op in ["all_gather", "all_to_all", "all_reduce", "ring_exchange"]:
        assert hook(ch.CollectiveCall(op, x, None)) is x
