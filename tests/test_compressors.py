"""Property tests of every registered codec (single process, CPU)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compact_hooks.errors import ConfigError
from compact_hooks.registry import available_compressors, build_compressor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every registered name (defaults) plus parameterisations that reach other code paths:
# partial groups, other block sizes, quantized and rank-clipped low-rank factors, warm start.
EXTRA_SPECS: list[dict[str, Any]] = [
    {"name": "int8", "group_size": 16},
    {"name": "int4", "group_size": 7},
    {"name": "int2", "group_size": 5},
    {"name": "int2", "group_size": 1},
    {"name": "topk", "ratio": 0.3},
    {"name": "topk", "ratio": 1.0},
    {"name": "nm", "n": 1, "m": 2},
    {"name": "nm", "n": 3, "m": 4},
    {"name": "nm", "n": 5, "m": 512},
    {"name": "lowrank", "rank": 3, "factor_bits": 4},
    {"name": "lowrank", "rank": 2, "factor_bits": 8, "iters": 0},
    {"name": "lowrank", "rank": 40, "iters": 1, "warm_start": True},
]
SPECS: list[Any] = [*available_compressors(), *EXTRA_SPECS]


SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def spec_id(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return "-".join(f"{v}" for v in spec.values())


def rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((y - x).norm() / x.norm())


def roundtrip(codec: Any, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    payload = codec.encode(x, state)
    return payload, codec.decode(payload, x.shape, x.dtype)


def gaussian(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


shapes = st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    x = gaussian(shape, dtype, draw(st.integers(0, 2**31)), draw(st.sampled_from([1e-3, 1.0, 300.0])))
    sparsity = draw(st.sampled_from([0.0, 0.0, 0.5, 0.95]))
    if sparsity and x.numel():
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) >= sparsity
        x = torch.where(keep, x, torch.zeros_like(x))
    return x


# -- structure -----------------------------------------------------------------------------------
@SETTINGS
@given(spec=st.sampled_from(SPECS), x=tensors())
def test_payload_and_decode_contract(spec: Any, x: torch.Tensor) -> None:
    codec = build_compressor(spec)
    payload, y = roundtrip(codec, x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    if codec.variable_size:  # the declared size is an upper bound
        assert payload.numel() <= codec.payload_nbytes(x.shape, x.dtype)
    else:
        assert payload.numel() == codec.payload_nbytes(x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    if codec.is_lossless(x.dtype):
        assert torch.equal(y, x)
    # encoding is reproducible (lowrank's random start is seeded), decoding too
    assert torch.equal(codec.encode(x), payload)
    assert torch.equal(codec.decode(payload, x.shape, x.dtype), y)
    # a payload starting at an odd byte of a bigger buffer (a slice of a gathered tensor) decodes the same
    buf = torch.zeros(payload.numel() + 3, dtype=torch.uint8)
    buf[1:-2] = payload
    assert torch.equal(codec.decode(buf[1:-2], x.shape, x.dtype), y)


@SETTINGS
@given(spec=st.sampled_from(SPECS), shape=shapes, dtype=st.sampled_from(DTYPES))
def test_zeros_decode_to_zeros(spec: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    codec = build_compressor(spec)
    x = torch.zeros(shape, dtype=dtype)
    _, y = roundtrip(codec, x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_non_float_input_raises_type_error(spec: Any, dtype: torch.dtype) -> None:
    codec = build_compressor(spec)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        codec.encode(torch.ones(4, 8, dtype=dtype))


def test_scalar_and_non_contiguous_inputs() -> None:
    for spec in SPECS:
        codec = build_compressor(spec)
        scalar = torch.tensor(-2.5)
        _, y = roundtrip(codec, scalar)
        assert y.shape == () and torch.isfinite(y)
        base = gaussian((16, 24), torch.float32, 3)
        x = base.T[::2]  # non-contiguous view
        _, y = roundtrip(codec, x)
        _, y_contig = roundtrip(codec, x.contiguous())
        assert torch.equal(y, y_contig)


# -- accuracy ------------------------------------------------------------------------------------
# Upper bounds of the relative error (||x^ - x|| / ||x||) on Gaussian data [64, 384]; measured
# values (float32) in the comments, the bounds add margin for float16 / bfloat16 rounding.
ERROR_BOUNDS: list[tuple[Any, float]] = [
    ("none", 0.0),
    ("fp16", 1e-3),
    ("bf16", 5e-3),
    ("int8", 0.01),  # 0.0064
    ({"name": "int8", "group_size": 100}, 0.01),  # partial groups
    ("int4", 0.12),  # 0.104
    ({"name": "int4", "group_size": 100}, 0.12),
    ("int2", 0.46),  # 0.426
    ("int2cf", 0.38),  # 0.348
    ("int1", 0.63),  # 0.598
    ("topk", 0.87),  # 0.848 (keeps 5%)
    ({"name": "topk", "ratio": 0.5}, 0.29),  # 0.267
    ("nm", 0.60),  # 0.578 (2 of 8)
    ({"name": "nm", "n": 2, "m": 4}, 0.39),  # 0.362
    ({"name": "lowrank", "rank": 384}, 2e-3),  # 3e-4: full rank, exact up to float16 factors
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "bound"), ERROR_BOUNDS, ids=[spec_id(s) for s, _ in ERROR_BOUNDS])
def test_relative_error_on_gaussian_data(spec: Any, bound: float, dtype: torch.dtype) -> None:
    codec = build_compressor(spec)
    x = gaussian((64, 384), dtype, 7, 3.0)
    _, y = roundtrip(codec, x)
    if spec == "none" or codec.is_lossless(dtype):
        assert torch.equal(y, x)
    else:
        assert rel_err(y, x) <= bound + (4e-3 if dtype == torch.bfloat16 else 0.0)


@pytest.mark.parametrize("factor_bits,bound", [(16, 2e-3), (8, 0.02), (4, 0.2)])
def test_lowrank_recovers_low_rank_data(factor_bits: int, bound: float) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 40, 6, generator=gen) @ torch.randn(6, 72, generator=gen)  # rank 6
    codec = build_compressor({"name": "lowrank", "rank": 8, "factor_bits": factor_bits})
    _, y = roundtrip(codec, x)
    assert rel_err(y, x) < bound


def test_lowrank_warm_start_keeps_a_basis_and_recovers_rank_r() -> None:
    gen = torch.Generator().manual_seed(11)
    left, right = torch.randn(96, 4, generator=gen), torch.randn(4, 80, generator=gen)
    codec = build_compressor({"name": "lowrank", "rank": 4, "iters": 1, "warm_start": True})
    state: dict[str, Any] = {}
    _, y = roundtrip(codec, left @ right, state)
    assert rel_err(y, left @ right) < 5e-3
    assert state["basis"].shape == (80, 4)
    # the next step: a nearby matrix of the same rank, started from the stored basis, even with no iteration
    codec0 = build_compressor({"name": "lowrank", "rank": 4, "iters": 0, "warm_start": True})
    x2 = (left + 0.1 * torch.randn(96, 4, generator=gen)) @ right
    _, y2 = roundtrip(codec0, x2, state)
    assert rel_err(y2, x2) < 5e-3
    # state None: cold start, nothing written
    payload, _ = roundtrip(codec, left @ right, None)
    assert torch.equal(payload, codec.encode(left @ right, {}))


def test_int1_is_exact_on_separable_magnitudes() -> None:
    gen = torch.Generator().manual_seed(2)
    tok = torch.rand(3, 5, 1, generator=gen) + 0.5
    ch = torch.rand(24, generator=gen) + 0.1
    signs = torch.where(torch.rand(3, 5, 24, generator=gen) > 0.5, 1.0, -1.0)
    x = signs * tok * ch
    _, y = roundtrip(build_compressor("int1"), x)
    assert rel_err(y, x) < 2e-3
    assert torch.equal(torch.sign(y), signs)


def test_int2cf_levels() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 48, generator=gen)
    codec = build_compressor("int2cf")
    _, y = roundtrip(codec, x)
    tokens, channels = x.shape
    a = x.abs()
    t = torch.outer(a.mean(1) / a.mean(), a.mean(0))
    ratio = (y / t).abs()
    # every value is 0.5 t or 2 t (up to float16 scales) with the sign of x, 2 t exactly where |x| > 1.25 t
    near_half, near_two = (ratio - 0.5).abs() < 1e-2, (ratio - 2.0).abs() < 4e-2
    assert torch.all(near_half | near_two)
    assert torch.equal(torch.signbit(y), torch.signbit(x))
    clear = ((a / t) - 1.25).abs() > 1e-2
    assert torch.equal(near_two[clear], (a > 1.25 * t)[clear])


def test_int2_grid_hits_the_extreme_exactly() -> None:
    x = torch.tensor([[0.1, -4.0, 0.9, 2.2, -1.1, 0.0, 3.9, -0.4]])
    _, y = roundtrip(build_compressor({"name": "int2", "group_size": 8}), x)
    # s = -e/2 = 2: levels {-2, -1, 0, 1} * 2 = {4, 2, 0, -2}
    assert torch.equal(y, torch.tensor([[0.0, -4.0, 0.0, 2.0, -2.0, 0.0, 2.0, 0.0]]))


def test_topk_and_nm_keep_the_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 1.0, 7.0, 0.01])
    _, y = roundtrip(build_compressor({"name": "topk", "ratio": 0.3}), x)
    assert torch.equal(y, torch.tensor([0.0, -5.0, 0, 3.0, 0, 0, 0, 0, 7.0, 0]))
    _, y = roundtrip(build_compressor({"name": "nm", "n": 1, "m": 4}), x)
    assert torch.equal(y, torch.tensor([0.0, -5.0, 0, 0, 0, 0, 0, 1.0, 7.0, 0]))


# -- saturation ----------------------------------------------------------------------------------
SATURATING = ["int8", "int4", "int2", "int1", "int2cf", "lowrank",
              {"name": "lowrank", "factor_bits": 8}, {"name": "lowrank", "factor_bits": 4},
              "topk", "nm"]


@pytest.mark.parametrize("spec", SATURATING, ids=spec_id)
def test_huge_values_decode_finite(spec: Any) -> None:
    codec = build_compressor(spec)
    gen = torch.Generator().manual_seed(4)
    near_max = torch.where(torch.rand(16, 64, generator=gen) > 0.5, 65504.0, -6.0e4)
    near_max[:, ::3] = (torch.randn(16, 22, generator=gen) * 3e4).clamp(-6e4, 6e4)
    for x in (near_max.half(), torch.full((16, 64), 65504.0).half(),
              (torch.randn(16, 64, generator=gen) * 1e30).bfloat16(),
              (torch.randn(16, 64, generator=gen) * 1e30).float()):
        _, y = roundtrip(codec, x)
        assert torch.isfinite(y).all(), (spec, x.dtype)
    _, y = roundtrip(codec, near_max.half())
    if spec in ("int8", "int4"):
        assert rel_err(y, near_max) < {"int8": 0.01, "int4": 0.12}[spec]


def test_tiny_values_and_mixed_magnitudes() -> None:
    x = gaussian((8, 256), torch.float32, 9)
    x[0] *= 1e-4  # subnormal float16 scales: coarser, still bounded
    x[1] *= 1e4
    for spec, bound in (("int8", 0.01), ("int4", 0.12)):
        _, y = roundtrip(build_compressor(spec), x)
        assert rel_err(y[0], x[0]) < 2 * bound
        assert rel_err(y[2:], x[2:]) < bound


# -- configuration -------------------------------------------------------------------------------
BAD_PARAMS = [
    ("int2", "group_size", 0),
    ("int8", "group_size", -3),
    ("int4", "group_size", 2.5),
    ("int4", "group_size", True),
    ("topk", "ratio", 0),
    ("topk", "ratio", 1.5),
    ("nm", "m", 6),
    ("nm", "m", 1),
    ("nm", "n", 8),
    ("nm", "n", 0),
    ("lowrank", "rank", 0),
    ("lowrank", "iters", -1),
    ("lowrank", "factor_bits", 2),
    ("lowrank", "warm_start", "yes"),
]


@pytest.mark.parametrize(("name", "key", "value"), BAD_PARAMS)
def test_bad_params_raise_config_error_naming_the_key(name: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_compressor({"name": name, key: value})
    assert f"compressor.{key}" in str(info.value)
    assert info.value.key_path == f"compressor.{key}"


def test_params_round_trip_through_spec() -> None:
    for spec in SPECS:
        codec = build_compressor(spec)
        again = build_compressor(codec.spec())
        assert again.spec() == codec.spec() and again.fingerprint == codec.fingerprint


# -- sizes ---------------------------------------------------------------------------------------
RATIO_TARGETS = [
    ("int8", 1.94),
    ("int4", 3.84),
    ("int2", 7.45),
    ("int1", 15.5),
    ("int2cf", 7.9),
    ({"name": "lowrank", "rank": 32, "factor_bits": 4}, 99.0),
]


@pytest.mark.parametrize(("spec", "target"), RATIO_TARGETS, ids=[spec_id(s) for s, _ in RATIO_TARGETS])
def test_ratio_targets_on_flux_sized_activations(spec: Any, target: float) -> None:
    shape = (1088, 3072)
    codec = build_compressor(spec)
    ratio = math.prod(shape) * 2 / codec.payload_nbytes(shape, torch.float16)
    assert ratio >= target


def test_big_tensor_payload_matches_declared_size() -> None:
    x = gaussian((1088, 3072), torch.float16, 1)
    for spec, _ in RATIO_TARGETS:
        codec = build_compressor(spec)
        assert codec.encode(x).numel() == codec.payload_nbytes(x.shape, x.dtype)


def test_int2_payload_layout() -> None:
    """header | float16 scale | 2-bit codes, 4 per byte, first code in the low bits."""
    x = torch.tensor([[0.1, -4.0, 0.9, 2.2, -1.1, 0.0, 3.9, -0.4]])
    payload = build_compressor({"name": "int2", "group_size": 8}).encode(x)
    # scale s = -e / 2 = 2.0 (float16 0x4000); codes = level + 2 = [2, 0, 2, 3, 1, 2, 3, 2]
    assert payload[16:].tolist() == [0x00, 0x40, 2 | 0 << 2 | 2 << 4 | 3 << 6, 1 | 2 << 2 | 3 << 4 | 2 << 6]
