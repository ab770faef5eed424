"""Config errors name the key path; the block is read from and stripped out of DeepSpeed configs."""

import json

import pytest

import compact_hooks as ch
from compact_hooks.errors import ConfigError


def test_defaults_and_example_block():
    cfg = ch.load_config({"compact_hooks": {
        "enabled": True, "compressor": {"name": "int2", "group_size": 128}, "residual": "ef",
        "warmup_steps": 1, "collectives": ["all_to_all", "all_gather", "all_reduce"],
        "base_dtype": "input", "stats": {"enabled": True}}})
    assert cfg.residual == "ef" and cfg.collectives == ["all_to_all", "all_gather", "all_reduce"]
    assert cfg.build_compressor().spec() == {"name": "int2", "group_size": 128}
    assert ch.load_config(None) == ch.CompactConfig()


@pytest.mark.parametrize("block, key, words", [
    ({"compressor": "nope"}, "compact_hooks.compressor.name", "registered: "),
    ({"compressor": {"name": "int2", "group_size": 0}}, "compact_hooks.compressor.group_size", "group_size"),
    ({"compressor": {"name": "int2", "bits": 3}}, "compact_hooks.compressor.bits", "no parameter"),
    ({"compressor": {"group_size": 64}}, "compact_hooks.compressor", "'name'"),
    ({"warmup": 1}, "compact_hooks.warmup", "unknown key"),
    ({"warmup_steps": "one"}, "compact_hooks.warmup_steps", "integer"),
    ({"warmup_steps": -1}, "compact_hooks.warmup_steps", "greater than or equal"),
    ({"residual": "feedback"}, "compact_hooks.residual", "'ef'"),
    ({"stats": {"enabled": "yes"}}, "compact_hooks.stats.enabled", "boolean"),
    ({"stats": {"colour": 1}}, "compact_hooks.stats.colour", "unknown key"),
    ({"collectives": ["all_gather", "broadcast"]}, "compact_hooks.collectives[1]", "all_gather"),
    ({"timeout_s": 0}, "compact_hooks.timeout_s", "greater than"),
])
def test_bad_block_names_the_key(block, key, words):
    with pytest.raises(ConfigError) as info:
        ch.load_config({"compact_hooks": block})
    assert info.value.key_path == key
    assert str(info.value).startswith(key + ": ")
    assert words in str(info.value)


def test_whole_deepspeed_config_without_block_is_explained():
    with pytest.raises(ConfigError, match='"compact_hooks" block'):
        ch.load_config({"train_batch_size": 8, "fp16": {"enabled": True}})


def test_json_file_round_trip_and_strip(tmp_path):
    ds = {"train_batch_size": 1, "tensor_parallel": {"tp_size": 2},
          "compact_hooks": {"compressor": "int4", "residual": "ef2"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = ch.load_config(path)
    assert cfg.compressor == "int4" and cfg.residual == "ef2"
    stripped = ch.strip_config(path)
    assert "compact_hooks" not in stripped and stripped["tensor_parallel"] == {"tp_size": 2}
    assert "compact_hooks" in ds  # the caller's dict is untouched


def test_bad_json_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"compact_hooks": {"compressor": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        ch.load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        ch.load_config(tmp_path / "missing.json")
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ch.load_config(lst)


def test_build_hook_kinds():
    assert isinstance(ch.build_hook({"enabled": False}), ch.PassthroughHook)
    assert isinstance(ch.build_hook({"hook": "stale"}), ch.StaleHook)
    assert isinstance(ch.build_hook({"hook": "cast", "cast_dtype": "float16"}), ch.CastHook)
    hook = ch.build_hook({"compressor": {"name": "int4", "group_size": 64}})
    assert isinstance(hook, ch.CompactHook) and hook.session.compressor.spec()["group_size"] == 64
