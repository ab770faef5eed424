"""Reliability, item 1: config fuzzing. Every malformed ``"compact_hooks"`` block or JSON file makes
:func:`compact_hooks.load_config` raise :class:`compact_hooks.ConfigError` naming the key path, and
no other exception type escapes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compact_hooks as ch
from compact_hooks.config import MAX_TIMEOUT_S

pytestmark = pytest.mark.reliability

FIELDS = set(ch.CompactConfig.model_fields)
OPS = ["all_gather", "all_to_all", "all_reduce", "ring_exchange"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
not_bool = json_values.filter(lambda v: not isinstance(v, bool))
not_int = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
not_str = json_values.filter(lambda v: not isinstance(v, str))

# -- valid blocks (the base every mutation starts from) --------------------------------------
valid_compressors = st.sampled_from([
    "int2", "int4", "int8", "int1", "int2cf", "fp16", "bf16", "none",
    {"name": "int2", "group_size": 64}, {"name": "lowrank", "rank": 8, "factor_bits": 4},
    {"name": "topk", "ratio": 0.1}, {"name": "nm", "n": 2, "m": 8},
])
valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "enabled": st.booleans(),
    "hook": st.sampled_from(["compact", "stale", "passthrough", "cast"]),
    "compressor": valid_compressors,
    "residual": st.sampled_from(["none", "delta", "ef", "ef2"]),
    "warmup_steps": st.integers(0, 5),
    "collectives": st.lists(st.sampled_from(OPS), unique=True),
    "base_dtype": st.sampled_from(["float32", "bfloat16", "float16", "input"]),
    "cast_dtype": st.sampled_from(["float16", "bfloat16"]),
    "verify_every": st.integers(0, 10),
    "timeout_s": st.floats(0.5, 1000) | st.integers(1, 1000),
    "stats": st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "error_every": st.integers(0, 5)}),
}
valid_blocks = st.fixed_dictionaries({}, optional=valid_fields)


# -- one mutation each: (field or None, bad value or block patch, expected key path) -----------
def _top(field: str, values: st.SearchStrategy[Any], path: str = "") -> st.SearchStrategy[tuple[dict, str]]:
    return values.map(lambda v: ({field: v}, f"compact_hooks.{field}{path}"))


def _literal(field: str, allowed: list[str]) -> st.SearchStrategy[tuple[dict, str]]:
    return _top(field, json_values.filter(lambda v: v not in allowed))


bad_timeouts = (st.floats(max_value=0.0) | st.just(math.inf) | st.just(math.nan) | st.floats(min_value=MAX_TIMEOUT_S * 1.01)
                | not_str.filter(lambda v: isinstance(v, (bool, list, dict)) or v is None) | st.text(max_size=5))
bad_collective_item = json_values.filter(lambda v: v not in OPS)


@st.composite
def bad_collectives(draw: st.DrawFn) -> tuple[dict, str]:
    kind = draw(st.sampled_from(["not_list", "bad_item", "duplicate"]))
    if kind == "not_list":
        return {"collectives": draw(json_values.filter(lambda v: not isinstance(v, list)))}, "compact_hooks.collectives"
    good = draw(st.lists(st.sampled_from(OPS), unique=True, max_size=3))
    if kind == "duplicate":
        op = draw(st.sampled_from(OPS))
        return {"collectives": good + [op] if op in good else good + [op, op]}, "compact_hooks.collectives"
    at = draw(st.integers(0, len(good)))
    return {"collectives": good[:at] + [draw(bad_collective_item)] + good[at:]}, f"compact_hooks.collectives[{at}]"


@st.composite
def bad_stats(draw: st.DrawFn) -> tuple[dict, str]:
    kind = draw(st.sampled_from(["not_object", "unknown", "enabled", "error_every"]))
    if kind == "not_object":
        return {"stats": draw(json_values.filter(lambda v: not isinstance(v, dict)))}, "compact_hooks.stats"
    if kind == "unknown":
        key = draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("enabled", "error_every")))
        return {"stats": {key: draw(json_values)}}, f"compact_hooks.stats.{key}"
    if kind == "enabled":
        return {"stats": {"enabled": draw(not_bool)}}, "compact_hooks.stats.enabled"
    return {"stats": {"error_every": draw(not_int | st.integers(max_value=-1))}}, "compact_hooks.stats.error_every"


# known parameters: (valid values, invalid values); extra keys make a spec valid when one is bad
PARAMS: dict[str, dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]] = {
    "int2": {"group_size": (st.integers(1, 512), not_int | st.integers(max_value=0))},
    "int4": {"group_size": (st.integers(1, 512), not_int | st.integers(max_value=0))},
    "int8": {"group_size": (st.integers(1, 512), not_int | st.integers(max_value=0))},
    "lowrank": {"rank": (st.integers(1, 64), not_int | st.integers(max_value=0)),
                "iters": (st.integers(0, 3), not_int | st.integers(max_value=-1)),
                "factor_bits": (st.sampled_from([16, 8, 4]),
                                json_values.filter(lambda v: v not in (16, 8, 4) or isinstance(v, bool))),
                "warm_start": (st.booleans(), not_bool)},
    "topk": {"ratio": (st.floats(0.01, 1.0), json_values.filter(
        lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1))},
    "nm": {"m": (st.sampled_from([2, 4, 8, 16]), not_int | st.integers(-4, 1) | st.sampled_from([3, 5, 6, 7, 12]))},
}
PARAMLESS = ["int1", "int2cf", "none", "fp16", "bf16"]


@st.composite
def bad_compressor(draw: st.DrawFn) -> tuple[dict, str]:
    kind = draw(st.sampled_from(["type", "unknown_name", "name_type", "no_name", "unknown_param", "bad_param",
                                 "nm_n", "nested"]))
    if kind == "type":
        return {"compressor": draw(json_values.filter(lambda v: not isinstance(v, (str, dict))))}, "compact_hooks.compressor"
    if kind == "unknown_name":
        name = draw(st.text(max_size=10).filter(lambda n: n not in ch.available_compressors()))
        spec = draw(st.sampled_from([name, {"name": name}]))
        return {"compressor": spec}, "compact_hooks.compressor.name"
    if kind == "name_type":
        return {"compressor": {"name": draw(not_str)}}, "compact_hooks.compressor.name"
    if kind == "no_name":
        return {"compressor": draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k != "name"), json_values,
                                                   max_size=3))}, "compact_hooks.compressor"
    if kind == "nested":  # a spec inside a spec
        return {"compressor": {"name": {"name": "int2"}}}, "compact_hooks.compressor.name"
    if kind == "nm_n":
        m = draw(st.sampled_from([2, 4, 8, 16]))
        n = draw(not_int | st.integers(max_value=0) | st.integers(m, m + 10))
        return {"compressor": {"name": "nm", "m": m, "n": n}}, "compact_hooks.compressor.n"
    name = draw(st.sampled_from(sorted(PARAMS) + PARAMLESS))
    known = PARAMS.get(name, {})
    spec: dict[str, Any] = {"name": name}
    for param, (good, _) in known.items():
        if draw(st.booleans()):
            spec[param] = draw(good)
    if kind == "unknown_param" or not known:
        param = draw(st.text(min_size=1, max_size=8).filter(lambda k: k != "name" and k not in known))
        spec[param] = draw(json_values)
        return {"compressor": spec}, f"compact_hooks.compressor.{param}"
    param = draw(st.sampled_from(sorted(known)))
    spec[param] = draw(known[param][1])
    return {"compressor": spec}, f"compact_hooks.compressor.{param}"


unknown_keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS)
mutations = st.one_of(
    st.tuples(unknown_keys, json_values).map(lambda kv: ({kv[0]: kv[1]}, f"compact_hooks.{kv[0]}")),
    _top("enabled", not_bool),
    _literal("hook", ["compact", "stale", "passthrough", "cast"]),
    _literal("residual", ["none", "delta", "ef", "ef2"]),
    _literal("base_dtype", ["float32", "bfloat16", "float16", "input"]),
    _literal("cast_dtype", ["float16", "bfloat16"]),
    _top("warmup_steps", not_int | st.integers(max_value=-1)),
    _top("verify_every", not_int | st.integers(max_value=-1)),
    _top("timeout_s", bad_timeouts),
    bad_collectives(),
    bad_stats(),
    bad_compressor(),
    st.just(({"compact_hooks": {"enabled": True}}, "compact_hooks.compact_hooks")),  # nested twice
)


def _load(source: Any) -> ch.CompactConfig:
    """load_config, turning any exception but ConfigError into a test failure with the culprit."""
    try:
        return ch.load_config(source)
    except ch.ConfigError:
        raise
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__} escaped load_config for {source!r}: {exc}")


@SETTINGS
@given(valid_blocks)
def test_valid_blocks_load(block: dict) -> None:
    """The control: the base blocks that the mutations start from are accepted."""
    cfg = _load(block)
    assert cfg.residual == block.get("residual", "ef")


@SETTINGS
@given(valid_blocks, mutations, st.sampled_from(["block", "deepspeed", "file"]))
def test_malformed_block_names_key_path(base: dict, mutation: tuple[dict, str], form: str) -> None:
    """One bad key or value in an otherwise valid block: ConfigError at exactly that key path."""
    patch, path = mutation
    block = {**base, **patch}
    if "compact_hooks" in block and form == "block":  # a bare block holding "compact_hooks" is a DeepSpeed config
        form = "deepspeed"
    source: Any = block if form == "block" else {"train_batch_size": 8, "compact_hooks": block}
    if form == "file":
        try:
            text = json.dumps(source)
        except (TypeError, ValueError):
            return  # not representable as JSON (JSON files cannot hold it)
        with tempfile.TemporaryDirectory() as d:
            file = Path(d, "ds_config.json")
            file.write_text(text)
            with pytest.raises(ch.ConfigError) as info:
                _load(file)
    else:
        with pytest.raises(ch.ConfigError) as info:
            _load(source)
    assert info.value.key_path == path, f"{block!r}: {info.value}"
    assert str(info.value).startswith(path + ": ")


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6), json_values, max_size=5))
def test_arbitrary_blocks_only_config_error(block: dict) -> None:
    """Random blocks (known keys with random values, random keys): accepted, or a ConfigError
    whose key path is a key of the block."""
    try:
        _load(block)
    except ch.ConfigError as exc:
        named = [k for k in block if exc.key_path == f"compact_hooks.{k}"
                 or exc.key_path.startswith((f"compact_hooks.{k}.", f"compact_hooks.{k}["))]
        assert named or exc.key_path == "compact_hooks", exc


valid_json = valid_blocks.map(lambda b: json.dumps({"train_batch_size": 8, "compact_hooks": b}, indent=1))


@SETTINGS
@given(valid_json, st.data())
def test_truncated_json_file(text: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(text) - 1))
    with tempfile.TemporaryDirectory() as d:
        file = Path(d, "cfg.json")
        file.write_text(text[:cut])
        with pytest.raises(ch.ConfigError) as info:
            _load(file)
        assert info.value.key_path == str(file) and "JSON" in str(info.value)


@SETTINGS
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_file(raw: bytes) -> None:
    """Not JSON, not UTF-8, not an object: ConfigError naming the file; a valid object loads or
    raises ConfigError inside its block."""
    with tempfile.TemporaryDirectory() as d:
        file = Path(d, "cfg.json")
        file.write_bytes(raw)
        try:
            _load(file)
        except ch.ConfigError as exc:
            assert exc.key_path == str(file) or exc.key_path.startswith("compact_hooks"), exc


@pytest.mark.parametrize("raw, words", [
    (b"\xff\xfe{}", "UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"compact_hooks": {"warmup_steps": ' + b"1" * 5000 + b"}}", "digits"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"compact_hooks"', "must be a JSON object"),
    (b"", "not valid JSON"),
])
def test_hostile_files(tmp_path: Path, raw: bytes, words: str) -> None:
    file = tmp_path / "cfg.json"
    file.write_bytes(raw)
    with pytest.raises(ch.ConfigError) as info:
        _load(file)
    assert info.value.key_path == str(file) and words in str(info.value)


def test_unusable_paths(tmp_path: Path) -> None:
    for path in [tmp_path, tmp_path / "missing.json", str(tmp_path / "nul\0byte.json")]:
        with pytest.raises(ch.ConfigError):
            _load(path)


@pytest.mark.parametrize("block, path", [
    ({"timeout_s": math.inf}, "compact_hooks.timeout_s"),  # would overflow timedelta at the first wait
    ({"timeout_s": 1e15}, "compact_hooks.timeout_s"),
    ({1: True}, "compact_hooks.1"),  # a non-string key (a Python mapping, not JSON)
    ({"stats": {2: 1}}, "compact_hooks.stats.2"),
    ({"compressor": {"name": "int2", 3: 1}}, "compact_hooks.compressor.3"),
    ({"compressor": {"name": "nm", "n": 1, "m": 3}}, "compact_hooks.compressor.m"),  # "length" holds an n
    ({"compressor": 5}, "compact_hooks.compressor"),
])
def test_regressions(block: dict, path: str) -> None:
    """Cases the fuzzing found: each escaped as another exception or named the wrong key."""
    with pytest.raises(ch.ConfigError) as info:
        _load(block)
    assert info.value.key_path == path


def test_json_nan_literals_rejected(tmp_path: Path) -> None:
    """Python's json accepts NaN/Infinity literals; they must not reach a numeric setting."""
    file = tmp_path / "cfg.json"
    for literal in ["NaN", "Infinity", "-Infinity", "1e400"]:
        file.write_text(f'{{"compact_hooks": {{"timeout_s": {literal}}}}}')
        with pytest.raises(ch.ConfigError) as info:
            _load(os.fspath(file))
        assert info.value.key_path == "compact_hooks.timeout_s"
