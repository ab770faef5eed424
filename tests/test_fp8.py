"""The ``fp8`` codec: e4m3 (or e5m2) values with per-token or per-group scales, the format of the
FP8 communication of xDiT (``--use_fp8_comms``) and cache-dit (``--ulysses-float8``); as a plain cast
baseline (residual ``none``) and as a residual codec (``ef``)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks.errors import ConfigError
from compact_hooks.registry import available_compressors, build_compressor
from compact_hooks.wire import HEADER_NBYTES
from tests.distributed import run_ranks
from tests.test_compressors import SETTINGS, gaussian, rel_err, roundtrip, tensors
from tests.test_review_defects import HostTensorCounter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECS: list[Any] = ["fp8", {"name": "fp8", "group_size": 32}, {"name": "fp8", "group_size": 5},
                    {"name": "fp8", "format": "e5m2"}, {"name": "fp8", "group_size": 1, "format": "e5m2"}]
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}


# -- registration and sizes ----------------------------------------------------------------------
def test_registered_with_per_token_e4m3_defaults() -> None:
    assert "fp8" in available_compressors()
    codec = build_compressor("fp8")
    assert codec.spec() == {"name": "fp8", "group_size": None, "format": "e4m3"}
    assert not codec.summable and not codec.lossless_dtypes and not codec.variable_size
    assert not codec.needs_error_feedback  # usable as a plain cast (residual "none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_payload_size_per_token_and_per_group(dtype: torch.dtype) -> None:
    """One byte per value plus one 2-byte scale per row (per token) or per group of a row."""
    shape = (3, 7, 100)  # 21 rows of 100 channels
    assert build_compressor("fp8").payload_nbytes(shape, dtype) == HEADER_NBYTES + 21 * 2 + 2100
    grouped = build_compressor({"name": "fp8", "group_size": 32})  # 4 groups per row, the last partial
    assert grouped.payload_nbytes(shape, dtype) == HEADER_NBYTES + 21 * 4 * 2 + 2100
    assert build_compressor("fp8").payload_nbytes((0, 100), dtype) == HEADER_NBYTES


def test_ratio_on_flux_sized_activations() -> None:
    """About 2x fewer bytes than fp16/bf16 (4x than fp32): the FP8 comms users already run."""
    shape = (1088, 3072)
    codec = build_compressor("fp8")
    assert math.prod(shape) * 2 / codec.payload_nbytes(shape, torch.bfloat16) >= 1.99
    assert math.prod(shape) * 4 / codec.payload_nbytes(shape, torch.float32) >= 3.99
    x = gaussian(shape, torch.bfloat16, 1)
    assert codec.encode(x).numel() == codec.payload_nbytes(shape, torch.bfloat16)


def test_payload_layout() -> None:
    """header | bfloat16 scale per row | one e4m3 byte per value (the row's largest magnitude on 448)."""
    x = torch.tensor([[448.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-896.0, 2.0, 3.0, 6.0]])
    payload = build_compressor("fp8").encode(x)
    body = payload[HEADER_NBYTES:]
    scales = body[:6].view(torch.bfloat16).float()
    assert scales.tolist() == [1.0, 0.0, 2.0]
    values = body[6:].view(torch.float8_e4m3fn).float().view(3, 4)
    assert values.tolist() == [[448.0, -1.0, 0.5, 0.0], [0.0] * 4, [-448.0, 1.0, 1.5, 3.0]]


# -- contract (as every codec: tests/test_compressors.py picks up the default spec too) -----------
@SETTINGS
@given(spec=st.sampled_from(SPECS), x=tensors())
def test_payload_and_decode_contract(spec: Any, x: torch.Tensor) -> None:
    codec = build_compressor(spec)
    payload, y = roundtrip(codec, x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_nbytes(x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert torch.equal(codec.encode(x), payload)
    buf = torch.zeros(payload.numel() + 3, dtype=torch.uint8)  # a payload at an odd byte of a bigger buffer
    buf[1:-2] = payload
    assert torch.equal(codec.decode(buf[1:-2], x.shape, x.dtype), y)
    # every value within half an fp8 step of its row's (group's) scale: the relative error of the format
    if x.numel():
        fmt = codec.params()["format"]
        bound = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}[fmt]
        xf, yf = x.double(), y.double()
        assert bool(((yf - xf).abs() <= bound * xf.abs() + _row_floor(codec, x)).all())


def _row_floor(codec: Any, x: torch.Tensor) -> torch.Tensor:
    """Absolute slack per value: the smallest subnormal step of its group (tiny values round to it),
    plus the input dtype's rounding of the decoded value."""
    fmt, g = codec.params()["format"], codec.params()["group_size"]
    c = x.shape[-1] if x.dim() else 1
    g = c if g is None else min(g, c)
    rows = x.double().reshape(-1, c)
    pad = (-c) % g
    a = torch.nn.functional.pad(rows.abs(), (0, pad)).view(rows.shape[0], -1, g).amax(-1)
    a = a.repeat_interleave(g, dim=1)[:, :c].reshape(x.shape)
    sub = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}[fmt]
    eps = torch.finfo(x.dtype).eps
    return a * (sub / FMAX[fmt] * 1.01 + 2 * eps) + torch.finfo(x.dtype).tiny


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_and_odd_shapes(spec: Any, dtype: torch.dtype) -> None:
    codec = build_compressor(spec)
    for shape in [(), (1,), (5,), (1, 1), (7, 1), (3, 5, 7), (2, 0, 4), (0,), (4, 129)]:
        zeros = torch.zeros(shape, dtype=dtype)
        _, y = roundtrip(codec, zeros)
        assert torch.equal(y, zeros), shape
        x = gaussian(shape, dtype, 3, 5.0)
        _, y = roundtrip(codec, x)
        assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
        if x.numel() > 4:
            assert rel_err(y, x) < 0.08, (shape, rel_err(y, x))
    x = gaussian((16, 24), torch.float32, 3).T[::2]  # non-contiguous
    assert torch.equal(roundtrip(codec, x)[1], roundtrip(codec, x.contiguous())[1])


# -- accuracy ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "bound"), [("fp8", 0.03), ({"name": "fp8", "group_size": 32}, 0.03),
                                             ({"name": "fp8", "format": "e5m2"}, 0.06)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relative_error_on_gaussian_data(spec: Any, bound: float, dtype: torch.dtype) -> None:
    """e4m3 keeps 3 mantissa bits (measured 0.022 on float32), e5m2 2 (0.044); far better than int4
    (0.104) and worse than int8 (0.0064) on this data: fp8 spends its bits on range."""
    codec = build_compressor(spec)
    x = gaussian((64, 384), dtype, 7, 3.0)
    _, y = roundtrip(codec, x)
    assert rel_err(y, x) <= bound


def test_per_token_scales_keep_small_rows() -> None:
    """Rows 12 orders of magnitude apart are each coded to fp8 precision (one per-tensor scale
    would flush the small rows to zero)."""
    x = gaussian((6, 256), torch.float32, 9)
    x[0] *= 1e-6
    x[1] *= 1e6
    x[2] *= 1e-20
    _, y = roundtrip(build_compressor("fp8"), x)
    for row in range(6):
        assert rel_err(y[row], x[row]) < 0.03, row


def test_groups_keep_an_outlier_local() -> None:
    """With ``group_size`` an outlier channel costs precision only in its own group."""
    x = gaussian((8, 256), torch.float32, 2)
    x[:, 3] = 1e5  # an outlier channel: per token, its row's other values sink towards e4m3's subnormals
    per_token = roundtrip(build_compressor("fp8"), x)[1]
    grouped = roundtrip(build_compressor({"name": "fp8", "group_size": 32}), x)[1]
    rest = slice(32, None)
    assert rel_err(grouped[:, rest], x[:, rest]) < 0.03
    assert rel_err(per_token[:, rest], x[:, rest]) > 2 * rel_err(grouped[:, rest], x[:, rest])


def test_values_on_the_e4m3_grid_are_exact() -> None:
    """A row whose largest magnitude is 448 has scale 1: e4m3 values round-trip bit for bit."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].view(2, -1)  # 254 finite codes (0x7f, 0xff are NaN)
    x = torch.cat([grid, torch.full((2, 1), 448.0)], dim=1)
    for dtype in DTYPES:
        _, y = roundtrip(build_compressor("fp8"), x.to(dtype))
        assert torch.equal(y, x.to(dtype)), dtype


# -- range ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_values_beyond_the_fp8_range_go_through_the_scales(fmt: str) -> None:
    codec = build_compressor({"name": "fp8", "format": fmt})
    gen = torch.Generator().manual_seed(4)
    near_max = torch.where(torch.rand(16, 64, generator=gen) > 0.5, 65504.0, -6.0e4)
    near_max[:, ::3] = (torch.randn(16, 22, generator=gen) * 3e4).clamp(-6e4, 6e4)
    bound = 0.03 if fmt == "e4m3" else 0.06
    for x in (near_max.half(), torch.full((16, 64), 65504.0).half(), torch.full((4, 8), -65504.0).half(),
              (torch.randn(16, 64, generator=gen) * 1e4).float(),
              (torch.randn(16, 64, generator=gen) * 1e30).bfloat16(),
              (torch.randn(16, 64, generator=gen) * 1e30).float(),
              torch.full((4, 8), 3.0e38), torch.full((4, 8), torch.finfo(torch.bfloat16).max).bfloat16()):
        _, y = roundtrip(codec, x)
        assert torch.isfinite(y).all(), (fmt, x.dtype)
        assert rel_err(y, x.double()) < bound, (fmt, x.dtype, rel_err(y, x.double()))
    y = roundtrip(codec, torch.full((2, 4), 65504.0).half())[1]
    assert bool((y.float() <= 65504.0).all()) and bool((y.float() > 65000.0).all())


def test_non_finite_inputs_decode_finite() -> None:
    """The Channel cleans NaN/Inf before encoding (and flags them); given them directly, the codec
    decodes a row holding NaN as zeros, +-Inf as +- the largest magnitude a row can carry, and the
    clean rows as usual."""
    x = torch.tensor([[1.0, float("nan"), -2.0, 4.0], [float("inf"), 1.0, float("-inf"), 0.0],
                      [448.0, -1.0, 0.5, 0.0]])
    for dtype in DTYPES:
        _, y = roundtrip(build_compressor("fp8"), x.to(dtype))
        assert torch.isfinite(y).all(), dtype
        assert torch.equal(y[0], torch.zeros(4, dtype=dtype))
        assert y[1, 0] >= torch.finfo(dtype).max / 2 and y[1, 2] <= -torch.finfo(dtype).max / 2
        assert torch.equal(y[2], x[2].to(dtype))


# -- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("group_size", 0), ("group_size", -3), ("group_size", 2.5),
                                            ("group_size", True), ("group_size", "row"), ("format", "e3m4"),
                                            ("format", 8), ("format", "E4M3 ")])
def test_bad_params_raise_config_error_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_compressor({"name": "fp8", key: value})
    assert info.value.key_path == f"compressor.{key}"


def test_params_round_trip_and_differ_in_fingerprint() -> None:
    codecs = [build_compressor(s) for s in SPECS]
    for codec in codecs:
        again = build_compressor(codec.spec())
        assert again.spec() == codec.spec() and again.fingerprint == codec.fingerprint
    assert len({c.fingerprint for c in codecs}) == len(codecs)


# -- as a residual codec and as a plain cast -----------------------------------------------------
def _drift(step: int, shape: tuple[int, ...] = (32, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x0, direction = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x0 + 0.05 * step * direction + 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_ef_beats_the_naive_cast(dtype: torch.dtype) -> None:
    """Error feedback with fp8 residuals: sender and receiver bases stay bit-identical and the error
    is far below the naive cast's (residual "none")."""
    codec = build_compressor("fp8")
    errors: dict[str, list[float]] = {}
    for mode in ("ef", "none"):
        sender, receiver = ch.Channel(codec, mode, None), ch.Channel(codec, mode, None)
        errors[mode] = []
        for step in range(8):
            x = _drift(step).to(dtype)
            payload, recon = sender.encode(x, step == 0)
            got = receiver.decode(payload, tuple(x.shape), dtype, step == 0)
            assert torch.equal(got, recon) and got.dtype == dtype
            if step:
                errors[mode].append(rel_err(got, x))
        if mode == "ef":
            assert torch.equal(sender.base, receiver.base)
    assert max(errors["none"]) < 0.03
    assert sum(errors["ef"]) < 0.5 * sum(errors["none"]), errors


def test_encode_and_decode_make_no_host_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = build_compressor("fp8")
    x = torch.randn(24, 64)
    sender, receiver = ch.Channel(codec, "ef", None), ch.Channel(codec, "ef", None)
    for full in (True, False):
        payload, _ = sender.encode(x, full)
        receiver.decode(payload, tuple(x.shape), x.dtype, full)
    counter = HostTensorCounter(monkeypatch)
    for full in (True, False, False):
        payload, _ = sender.encode(x + 0.1, full)
        receiver.decode(payload, tuple(x.shape), x.dtype, full)
        codec.decode(codec.encode(x), tuple(x.shape), x.dtype)
    assert counter.calls == []


def fp8_worker(rank: int, world: int) -> dict[str, Any]:
    """all_to_all and all_gather through CompactHook with fp8 as the naive cast and with ef."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name, cfg in {"naive": {"compressor": "fp8", "residual": "none"},
                      "ef": {"compressor": "fp8", "residual": "ef"},
                      "ef_bf16_groups": {"compressor": {"name": "fp8", "group_size": 16}, "residual": "ef"}}.items():
        dtype = torch.bfloat16 if name == "ef_bf16_groups" else torch.float32
        hook, plain = ch.CompactHook({**cfg, "warmup_steps": 1, "warmup_compressor": None}), ch.PassthroughHook()
        errs: dict[str, list[float]] = {"all_to_all": [], "all_gather": []}
        for step in range(6):
            x = (_drift(step, (4 * world, 64)) * (1 + rank)).to(dtype)
            for op in errs:
                got = hook(ch.CollectiveCall(op, x, None, key=op))
                want = plain(ch.CollectiveCall(op, x, None, key=op))
                if step:
                    errs[op].append(rel_err(got, want))
            hook.next_step()
        stats = hook.stats()
        out[name] = {"errors": errs, "wire": stats["wire_bytes"], "raw": stats["raw_bytes"]}
    return out


def test_fp8_through_compact_hook_on_two_ranks() -> None:
    results = run_ranks(fp8_worker, 2)
    for res in results:
        json.dumps(res)
        for name, r in res.items():
            assert r["wire"] < r["raw"], name
            for op, errs in r["errors"].items():
                assert len(errs) == 5 and max(errs) < 0.03, (name, op, errs)
        naive, ef = res["naive"]["errors"], res["ef"]["errors"]
        assert sum(ef["all_to_all"]) < sum(naive["all_to_all"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_payloads_equal_the_cpu_ones(spec: Any, dtype: torch.dtype) -> None:
    codec = build_compressor(spec)
    x = gaussian((40, 96), dtype, 5, 50.0)
    x[3] *= 1e4
    cpu = codec.encode(x)
    gpu = codec.encode(x.cuda())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(codec.decode(gpu, x.shape, dtype).cpu(), codec.decode(cpu, x.shape, dtype))


# -- listings and benches ------------------------------------------------------------------------
def test_listed_by_compact_hooks_compressors_and_measured_by_bench_codecs(capsys: pytest.CaptureFixture) -> None:
    from compact_hooks.cli import main

    assert main(["compressors", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fp8"]["params"] == {"group_size": None, "format": "e4m3"}
    assert "e4m3" in rows["fp8"]["summary"] and "per token" in rows["fp8"]["summary"]
    assert main(["bench", "codecs", "--shape", "64,256", "--dtype", "bfloat16", "--repeats", "2",
                 "--compressor", "fp8", "--compressor", '{"name": "fp8", "format": "e5m2"}', "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["codecs"]] == ["fp8", "fp8"]
    for r in out["codecs"]:
        assert 1.9 < r["ratio"] < 2.0 and 0 < r["rel_error"] < 0.06


def test_bench_rows() -> None:
    from compact_hooks.bench.e2e_setup import COMPACT_METHODS, METHOD_ORDER
    from compact_hooks.bench.quality import METHODS

    assert dict(METHODS)["naive fp8"] == {"compressor": "fp8", "residual": "none"}
    assert COMPACT_METHODS["naive_fp8"] == {"compressor": "fp8", "residual": "none"}
    assert "naive_fp8" in METHOD_ORDER
