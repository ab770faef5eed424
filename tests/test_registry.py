"""The registry: names, dict specs, clear errors, and third-party codecs through entry points."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import compact_hooks as ch
from compact_hooks.errors import ConfigError


def test_builtins_registered():
    names = ch.available_compressors()
    for name in ["none", "fp16", "bf16", "int8", "int4", "int2", "int1", "int2cf", "topk", "nm", "lowrank"]:
        assert name in names


def test_build_from_name_dict_and_instance():
    codec = ch.build_compressor({"name": "lowrank", "rank": 8, "factor_bits": 8})
    assert codec.params()["rank"] == 8 and ch.build_compressor(codec) is codec
    assert ch.build_compressor("int8").name == "int8"


def test_unknown_name_lists_registered():
    with pytest.raises(ConfigError, match="registered: .*int2"):
        ch.build_compressor("int3")


def test_register_decorator_in_process():
    from compact_hooks.compressors.cast import NoneCompressor
    from compact_hooks.registry import Registry

    reg = Registry()
    reg.register("copy_of_none", type("CopyOfNone", (NoneCompressor,), {}))
    assert isinstance(reg.build("copy_of_none"), NoneCompressor)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("copy_of_none", type("Other", (NoneCompressor,), {}))


PLUGIN = textwrap.dedent('''
    import torch
    from compact_hooks.compressors.base import Compressor, numel_of
    from compact_hooks.wire import from_bytes


    class HalfPlugin(Compressor):
        """A third-party codec: float16 on the wire, with a scale parameter."""

        def __init__(self, scale: float = 1.0):
            if scale <= 0:
                raise ValueError(f"scale must be > 0, got {scale}")
            self.scale = scale
            super().__init__()

        def params(self):
            return {"scale": self.scale}

        def body_nbytes(self, shape, dtype):
            return numel_of(shape) * 2

        def encode_body(self, x, state):
            return [(x * self.scale).to(torch.float16)]

        def decode_body(self, body, shape, dtype):
            return (from_bytes(body, torch.float16, numel_of(shape)).view(shape).to(dtype) / self.scale)
''')


def test_entry_point_plugin_used_from_json(tmp_path):
    """A separate package declares a codec in the ``compact_hooks.compressors`` entry-point group;
    a fresh interpreter builds it by name from a JSON config."""
    site = tmp_path / "site"
    (site / "half_plugin").mkdir(parents=True)
    (site / "half_plugin" / "__init__.py").write_text(PLUGIN)
    dist_info = site / "half_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[compact_hooks.compressors]\nhalf = half_plugin:HalfPlugin\n")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"compact_hooks": {"compressor": {"name": "half", "scale": 2.0}}}))
    script = textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {str(site)!r})
        import compact_hooks as ch
        cfg = ch.load_config({str(config)!r})
        codec = cfg.build_compressor()
        x = torch.randn(4, 8)
        y = codec.decode(codec.encode(x), x.shape, x.dtype)
        assert "half" in ch.available_compressors()
        assert codec.payload_nbytes(x.shape, x.dtype) == 16 + 64
        print(type(codec).__name__, float((y - x).abs().max()))
        try:
            ch.load_config({{"compact_hooks": {{"compressor": {{"name": "half", "scale": -1}}}}}})
        except ch.ConfigError as exc:
            print("ERR", exc)
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    name, err = lines[0].split()
    assert name == "HalfPlugin" and float(err) < 1e-2
    assert lines[1].startswith("ERR compact_hooks.compressor.scale:")


def test_non_float_rejected():
    codec = ch.build_compressor("fp16")
    with pytest.raises(TypeError, match="Non-float tensors are never compressed"):
        codec.encode(torch.arange(4))
