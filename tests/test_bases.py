"""Issue 23: 8-bit bases (base_dtype int8 / fp8), offloaded bases (base_device cpu), rules naming
them, and the base memory formulas of `bench scaling --preset` against Session.memory_bytes()."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks import bases
from compact_hooks.bases import GROUP, OffloadWindow, QuantBase, dequantize, quantize
from compact_hooks.config import load_config
from compact_hooks.errors import ConfigError
from compact_hooks.registry import available_compressors, build_compressor
from compact_hooks.residual import Channel, Session
from tests import bases_workers as W
from tests.distributed import run_ranks

QUANT = ["int8", "fp8"]
LOSSY = [n for n in available_compressors() if n != "none"]  # "none" is lossless: the plain path
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def walk(shape, steps, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x, d = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return [((x + 0.05 * t * d + 0.01 * torch.randn(shape, generator=g)) * scale) for t in range(steps)]


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# -- the 8-bit store -----------------------------------------------------------------------------
@given(kind=st.sampled_from(QUANT), n=st.integers(1, 700), scale=st.sampled_from([1e-30, 1e-3, 1.0, 6e37]),
       seed=st.integers(0, 2**16))
@EXAMPLES
def test_quantize_round_trip_is_bounded_and_sized(kind, n, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    x[0] = torch.finfo(torch.float32).max if seed % 3 == 0 else x[0]  # a saturated base value
    q = quantize(x, kind)
    back = dequantize(q)
    assert back.shape == x.shape and torch.isfinite(back).all()
    groups = -(-n // GROUP)
    assert bases.nbytes(q) == groups * GROUP + 4 * groups == bases.quant_nbytes(n)
    padded = torch.nn.functional.pad(x, (0, groups * GROUP - n)).view(groups, GROUP)
    amax = padded.abs().amax(1, keepdim=True)
    err = torch.nn.functional.pad(back - x, (0, groups * GROUP - n)).view(groups, GROUP).abs()
    # int8: half a step of amax/127; fp8 e4m3: 3 mantissa bits, a relative error of at most 2^-4
    # (and subnormals of the scaled value, below 2^-6, an absolute step of 2^-10 of the scale)
    bound = amax / 254 * 1.0001 if kind == "int8" else padded.abs() / 16 + amax / 448 * 2**-9
    assert (err <= bound + 1e-45).all()


def test_quantize_is_deterministic_and_fp8_uses_e4m3_rounding():
    x = torch.tensor([0.0, 1.0, -2.5, 300.0, 448.0, 1e-3] + [0.0] * 58)
    q = quantize(x, "fp8")
    assert q.scales[0] == 1.0  # amax 448: the values themselves, cast to e4m3 (round to nearest even)
    assert torch.equal(q.codes.view(torch.float8_e4m3fn).float().view(-1), x.to(torch.float8_e4m3fn).float())
    assert torch.equal(quantize(x, "int8").codes, quantize(x.clone(), "int8").codes)


# -- channels: sender and receiver bit-identical ------------------------------------------------
@given(codec=st.sampled_from(LOSSY), kind=st.sampled_from(QUANT), mode=st.sampled_from(["ef", "ef2", "delta"]),
       rows=st.integers(1, 9), cols=st.integers(1, 200), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-4, 1.0, 6e4, 1e30]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       bad_step=st.sampled_from([None, 3]))
@EXAMPLES
def test_8bit_bases_keep_sender_and_receiver_identical_over_50_steps(codec, kind, mode, rows, cols, seed, scale,
                                                                     dtype, bad_step):
    spec = "auto" if codec == "auto" else codec
    if codec == "auto" and mode == "delta":
        mode = "ef"  # auto needs error feedback
    c = build_compressor(spec)
    sender, receiver = Channel(c, mode, kind), Channel(c, mode, kind)
    for t, x in enumerate(walk((rows, cols), 50, seed, scale)):
        x = x.to(dtype)
        if t == bad_step:
            x[0, 0] = float("nan")
        payload, recon = sender.encode(x, t == 0)
        out = receiver.decode(payload, x.shape, x.dtype, t == 0)
        assert torch.equal(bits(out), bits(recon))
        assert sender.digest() == receiver.digest()
        assert isinstance(sender.base, QuantBase) and torch.isfinite(dequantize(sender.base)).all()


def test_8bit_base_error_feedback_carries_the_rounding():
    """With a near-lossless codec (fp16) the main loss is the base's 8-bit rounding, and error
    feedback sends it with the next step: a constant input comes back far closer than the base."""
    c = build_compressor("fp16")
    x = torch.linspace(-3, 3, 256).reshape(2, 128)
    for kind in QUANT:
        sender = Channel(c, "ef", kind)
        sender.encode(x, True)
        rounding = (dequantize(sender.base) - x).abs().max()
        assert rounding > 0  # the base is rounded ...
        _, recon = sender.encode(x, False)
        assert (recon - x).abs().max() < rounding / 100  # ... and the residual sends the difference


def test_8bit_base_memory_is_about_half_of_bf16():
    x = torch.randn(64, 640)
    sizes = {}
    for bd in ("bfloat16", "int8", "fp8"):
        s = Session(build_compressor("int2"), "ef", 1, bd)
        s.prepare("k", tuple(x.shape), x.dtype)
        s.channel("k", 0, 1).encode(x, True)
        sizes[bd] = s.memory_bytes()
    assert sizes["bfloat16"] == x.numel() * 2
    assert sizes["int8"] == sizes["fp8"] == x.numel() + 4 * x.numel() // GROUP
    assert sizes["int8"] / sizes["bfloat16"] <= 0.55


# -- kernels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [{"base_dtype": "int8"}, {"base_dtype": "fp8"}, {"offload": True}])
def test_fused_kernels_take_the_torch_path_for_8bit_and_offloaded_bases(setup):
    """kernels="triton" would run a float base on the kernels; these bases take the torch path,
    with the same payloads as kernels="torch"."""
    c = build_compressor("int2")
    kw = {"offload": OffloadWindow()} if setup.get("offload") else {}
    bd = setup.get("base_dtype", torch.float32)
    fused = Channel(c, "ef", bd, kernels="triton", **kw)
    ref = Channel(c, "ef", bd, kernels="torch", **({"offload": OffloadWindow()} if kw else {}))
    assert not fused._fused(torch.device("cpu"), (4, 128))
    assert Channel(c, "ef", torch.float32, kernels="torch")._fused(torch.device("cpu"), (4, 128)) is False
    for t, x in enumerate(walk((4, 128), 5, 0, 1.0)):
        a, ra = fused.encode(x, t == 0)
        b, rb = ref.encode(x, t == 0)
        assert torch.equal(a, b) and torch.equal(ra, rb)


# -- offloaded bases -----------------------------------------------------------------------------
@given(codec=st.sampled_from(["int2", "int8", "lowrank", "auto", "topk"]), bd=st.sampled_from([None, "bfloat16", "int8"]),
       mode=st.sampled_from(["ef", "ef2"]), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_offloaded_bases_give_the_same_payloads_bit_for_bit(codec, bd, mode, seed):
    c = build_compressor(codec)
    base_dtype = {"bfloat16": torch.bfloat16}.get(bd, bd)
    window = OffloadWindow()
    here = [Channel(c, mode, base_dtype) for _ in range(2)]
    away = [Channel(c, mode, base_dtype, offload=window) for _ in range(2)]
    for t, x in enumerate(walk((6, 96), 12, seed, 1.0)):
        if codec == "auto" and t:  # the planned residual path (Channel.residual) too
            here[0].residual(x), away[0].residual(x)
        p, r = here[0].encode(x, t == 0)
        q, s = away[0].encode(x, t == 0)
        assert torch.equal(p, q) and torch.equal(r, s)
        assert torch.equal(here[1].decode(p, x.shape, x.dtype, t == 0), away[1].decode(q, x.shape, x.dtype, t == 0))
        assert here[0].digest() == away[0].digest() == away[1].digest()
        assert all(isinstance(ch.base, bases.HostBase) for ch in away)  # between calls: on the host
        held = sum(bases.nbytes(ch.base) + bases.nbytes(ch.velocity) for ch in here)
        assert sum(ch.host_memory_bytes() for ch in away) == held > 0
        # on the device: only codec state (auto's activation norm), no base
        assert sum(ch.memory_bytes() for ch in away) == sum(ch.memory_bytes() for ch in here) - held


def test_offload_window_prefetches_the_next_key_and_stays_bounded():
    """After the first step the window knows the call order: starting key i prefetches key i+1; the
    device never holds more than two keys' bases; host bytes are all the bases."""
    c = build_compressor("int2")
    s = Session(c, "ef", 1, "bfloat16", base_device="cpu")
    keys = [f"b{i}:{r}" for i in range(4) for r in "qkvo"]
    x = torch.randn(8, 128)
    per_key = 2 * x.numel() * 2  # two channels of bf16
    for step in range(4):
        for key in keys:
            full = s.prepare(key, tuple(x.shape), x.dtype)
            p, _ = s.channel(key, 0, 1).encode(x * (1 + step), full)
            s.channel(key, 1, 0).decode(p, tuple(x.shape), x.dtype, full)
            if step >= 1:
                nxt = keys[(keys.index(key) + 1) % len(keys)]
                assert all(ch.prefetched is not None for ch in s.keys[nxt].channels.values())
        s.next_step()
    assert s.host_memory_bytes() == len(keys) * per_key
    assert s.window_peak_bytes() == 2 * per_key
    assert s.memory_bytes() == per_key  # the first key of the next step, prefetched


# -- config, rules, handshake --------------------------------------------------------------------
def test_config_accepts_base_options_and_rules_name_them():
    cfg = load_config({"base_dtype": "fp8", "base_device": "cpu"})
    assert (cfg.base_dtype, cfg.base_device) == ("fp8", "cpu")
    with pytest.raises(ConfigError, match="base_device"):
        load_config({"base_device": "gpu"})
    with pytest.raises(ConfigError, match="base_dtype"):
        load_config({"base_dtype": "int4"})
    with pytest.raises(ConfigError, match="plain"):
        load_config({"rules": [{"match": {"role": "k"}, "plain": True, "base_dtype": "int8"}]})
    hook = ch.CompactHook({"compressor": "int2", "rules": [
        {"match": {"key": "blocks.3*"}, "base_dtype": "int8"},
        {"match": {"role": "v"}, "base_dtype": "fp8", "base_device": "cpu"}]})
    big, v, default = (hook.session_for(k, "all_to_all", 2) for k in ("blocks.30.attn:q", "blocks.0.attn:v", "blocks.0.attn:q"))
    assert big.base_dtype == "int8" and big.offload is None and big.settings()["base_dtype"] == "int8"
    assert v.base_dtype == "fp8" and v.offload is not None and v.settings()["base_device"] == "cpu"
    assert default.base_dtype is None and default.settings()["base_device"] == "input"


@pytest.mark.parametrize("key,values", [("base_dtype", ["int8", "fp8"]), ("base_device", ["cpu", "input"])])
def test_ranks_that_disagree_on_base_options_raise_protocol_error(key, values):
    for message in run_ranks(W.disagree_worker, 2, key, values):
        assert "differ in: " + key in message


# -- real ranks ----------------------------------------------------------------------------------
# lowrank at rank 4: its default rank 32 would not be smaller than these chunks (the plain path)
CASES = [({"name": "lowrank", "rank": 4} if c == "lowrank" else c, "ef", k) for c in LOSSY for k in QUANT] + \
    [("int2", "ef2", k) for k in QUANT]


@pytest.mark.parametrize("world", [2, 3])
@given(cols=st.integers(64, 200), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e4]))
@settings(max_examples=1, deadline=None, phases=[Phase.generate])  # each example spawns ranks: no shrinking
def test_8bit_bases_identical_on_every_rank_for_every_op_and_codec(world, cols, seed, scale):
    results = run_ranks(W.identity_worker, world, CASES, (8 * world, cols), seed, scale, 50)
    for i, (codec, residual, kind) in enumerate(CASES):
        merged: dict[str, str] = {}
        for r in results:
            for stream, digest in r[i]["digests"].items():
                assert merged.setdefault(stream, digest) == digest, f"{codec} {residual} {kind}: {stream}"
        assert len(merged) >= 3 * world  # all_gather, all_to_all, ring (a summable cast's all_reduce is plain)
        assert max(r[i]["error"] for r in results) < 1.0, f"{codec} {kind}: error grew"


def test_offloaded_bases_on_ranks_give_the_same_results_bit_for_bit():
    cases = [("int2", "int8"), ("int2", "bfloat16"), ("int4", "input"), ("auto", "fp8")]
    for r in run_ranks(W.offload_worker, 2, cases, (4, 96), 6):
        for i in range(len(cases)):
            here, away = r[(i, "input")], r[(i, "cpu")]
            assert here["hashes"] == away["hashes"] and here["digests"] == away["digests"]
            assert away["host"] == here["bases"] == away["bases"] > 0 and here["host"] == here["peak"] == 0
            assert 0 < away["peak"] < here["bases"] and here["resyncs"] == away["resyncs"] == 0
            # the hook's stats: the device window and the host copies
            assert away["stats_host"] == away["host"] and here["stats_host"] == 0
            assert away["stats_memory"] == away["memory"] and here["stats_memory"] == here["memory"]


# -- formulas ------------------------------------------------------------------------------------
def test_wan_preset_on_8_gpus_meets_the_issue_bounds():
    from compact_hooks.bench.scaling_presets import PRESETS
    from compact_hooks.bench.scaling_report import preset_rows

    (row,) = preset_rows(PRESETS["wan2.1-14b-720p-81f"], [8], ["ulysses"], "int2", "int8")
    b = row["bases"]
    assert abs(b["bf16"]["device"] / 1e9 - 27.1) < 0.05  # the issue's "roughly 27 GB"
    assert b["int8"]["device"] <= 0.55 * b["bf16"]["device"]
    assert b["bf16 offloaded"]["device"] <= 2e9 and b["bf16 offloaded"]["host"] == b["bf16"]["device"]
    assert b["int8 offloaded"]["device"] <= b["bf16 offloaded"]["device"]


def test_preset_names_of_the_light_parser_are_the_presets():
    import argparse

    from compact_hooks.bench.options import add_scaling
    from compact_hooks.bench.scaling_presets import PRESETS

    kinds = argparse.ArgumentParser().add_subparsers()
    add_scaling(kinds)
    (parser,) = kinds.choices.values()
    action = next(a for a in parser._actions if a.dest == "preset")
    assert list(action.choices) == list(PRESETS)


@pytest.mark.parametrize("world,modes,options", [
    (2, ["ulysses", "allgather", "ring", "usp"], ["bf16", "int8", "fp8", "bf16 offloaded", "int8 offloaded"]),
    (4, ["usp"], ["bf16", "int8 offloaded"]),  # usp 2x2: Ulysses pairs and a ring of two
])
def test_formulas_match_session_memory_at_small_scale(world, modes, options):
    from compact_hooks.bench.scaling_report import small_check

    check = small_check(world, "int2", modes, options)
    assert len(check["rows"]) == len(modes) * len(options)
    for r in check["rows"]:
        if r["device_formula_is_bound"]:  # relays: K and V in flight together, the window formula is a bound
            assert 0 < r["measured_device_bytes"] <= r["formula_device_bytes"], r
        else:
            assert r["measured_device_bytes"] == r["formula_device_bytes"], r
        assert r["rel_diff"] == 0.0, r
        assert r["measured_host_bytes"] == r["formula_host_bytes"], r
        assert r["measured_raw_bytes_per_step"] == r["formula_raw_bytes_per_step"], r
        assert r["measured_wire_bytes_per_step"] == r["formula_wire_bytes_per_step"], r


def test_drift_with_int8_bases_stays_bounded():
    from compact_hooks.bench.drift import bench_drift

    r = bench_drift("int2", 50, (128, 256), torch.float16, base_dtype="int8")
    for mode in ("ef", "ef2"):
        assert max(r["modes"][mode][10:]) < 1.15 * max(r["input_base"][mode][10:]) + 0.005
        assert r["modes"][mode][-1] < 0.08
