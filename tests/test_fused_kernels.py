"""The fused Triton codec kernels against the torch codecs and Channel: byte-identical payloads,
bit-identical bases, lock-step streams in both pairings (fused sender -> torch receiver and torch
sender -> fused receiver), no host reads on the fused path.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: this module sets
``TRITON_INTERPRET=1`` (unless the environment says otherwise) before the kernels are first built.
With CUDA and ``TRITON_INTERPRET=0`` (compact_hooks/kernels/gpu_check.sh) they are compiled and run
on the GPU, under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import compact_hooks.kernels as kernels  # noqa: E402
from compact_hooks.kernels import _group_kernels, _sign_kernels, channel, common, dispatch, group, sign  # noqa: E402
from compact_hooks.registry import build_compressor  # noqa: E402
from compact_hooks.residual import Channel  # noqa: E402
from compact_hooks.wire import FLAGS_BYTE  # noqa: E402

if dispatch.interpreting() != bool(triton.knobs.runtime.interpret):
    importlib.reload(_group_kernels)  # built before the environment was set: build them again
    importlib.reload(_sign_kernels)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not dispatch.interpreting() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUP_CODECS = ["int8", "int4", "int2"]
CODECS = GROUP_CODECS + ["int1", "int2cf"]
FAST = settings(derandomize=True, deadline=None, max_examples=25, database=None)


def test_kernels_really_run():
    """On the CPU the kernels must be the interpreted Triton functions (never a silent skip)."""
    if DEVICE.type == "cpu":
        assert dispatch.interpreting()
        assert type(_group_kernels.group_tile_kernel).__name__ == "InterpretedFunction"
    assert kernels.use_fused("triton", build_compressor("int2"), DEVICE, (4, 8))


@contextlib.contextmanager
def no_sync():
    """CUDA: any host synchronisation inside raises (sync debug mode). CPU: nothing to check."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def torch_channel(codec, mode: str, base_dtype) -> Channel:
    """A Channel on the torch codecs (the reference), whatever the default dispatch is."""
    ch = Channel(codec, mode, base_dtype)
    if hasattr(ch, "kernels"):
        ch.kernels = "torch"
    return ch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (NaN compares equal to the same NaN)."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} of {a.numel()} differ, first at {diff[0].tolist()}"


def make_stream(seed: int, shape, dtype, steps: int, scale: float, zero_frac: float, bad_step: int):
    """``steps + 1`` activations of a slowly drifting stream (step 0 is the full send): values of
    magnitude ``scale`` (clipped into ``dtype``'s range), a fraction of exact zeros (never -0.0),
    and NaN/+-inf entries at ``bad_step`` (-1: none)."""
    gen = torch.Generator().manual_seed(seed)
    limit = torch.finfo(dtype).max
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = []
    for t in range(steps + 1):
        x = x + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        v = (x * scale).clamp(-limit, limit)
        v = torch.where(torch.rand(shape, generator=gen) < zero_frac, 0.0, v).to(dtype)
        v = torch.where(v == 0, torch.zeros((), dtype=dtype), v)  # no -0.0 (see docs: signed zeros)
        if t == bad_step and v.numel():
            flat = v.view(-1)
            picks = torch.randint(0, flat.numel(), (3,), generator=gen)
            flat[picks] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        out.append(v.to(DEVICE))
    return out


shapes = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40)),
    st.tuples(st.integers(1, 90)),
    st.just(()),
)
scales = st.sampled_from([1.0, 1e-3, 3e4, 6.5e4, 1e30, 1e-30])
base_dtypes = st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16])


def run_stream(name, group_size, mode, shape, dtype, base_dtype, scale, zero_frac, seed, bad_step, steps=3):
    codec = build_compressor({"name": name, "group_size": group_size} if name in GROUP_CODECS else name)
    if not kernels.supports(codec, tuple(shape)):
        return
    xs = make_stream(seed, shape, dtype, steps, scale, zero_frac, bad_step)
    ref_send, fused_send = torch_channel(codec, mode, base_dtype), torch_channel(codec, mode, base_dtype)
    torch_recv, fused_recv = torch_channel(codec, mode, base_dtype), torch_channel(codec, mode, base_dtype)
    first = ref_send.encode(xs[0], True)[0]
    fused_send.encode(xs[0], True)
    for recv in (torch_recv, fused_recv):
        recv.decode(first, tuple(shape), dtype, True)
    for t, x in enumerate(xs[1:], 1):
        p_ref, r_ref = ref_send.encode(x, False)
        with no_sync():
            p_fused, r_fused = channel.encode(fused_send, x)
            out_fused = channel.decode(fused_recv, p_ref, tuple(shape), dtype)
        out_torch = torch_recv.decode(p_fused, tuple(shape), dtype, False)
        where = f"step {t}"
        assert_same(p_fused, p_ref, f"payload, {where}")
        assert_same(r_fused, r_ref, f"sender reconstruction, {where}")
        assert_same(out_fused, r_ref, f"fused receiver output, {where}")
        assert_same(out_torch, r_ref, f"torch receiver output, {where}")
        for attr in ("base", "velocity", "previous_x"):
            assert_same(getattr(fused_send, attr), getattr(ref_send, attr), f"sender {attr}, {where}")
        for attr in ("base", "velocity"):
            assert_same(getattr(fused_recv, attr), getattr(ref_send, attr), f"fused receiver {attr}, {where}")
            assert_same(getattr(torch_recv, attr), getattr(ref_send, attr), f"torch receiver {attr}, {where}")
        for ch in (fused_send, fused_recv, torch_recv):
            assert int(ch.nonfinite) == int(ref_send.nonfinite), f"non-finite count, {where}"


@FAST
@given(name=st.sampled_from(CODECS), group_size=st.sampled_from([1, 2, 3, 4, 5, 8, 12, 16, 32, 128]),
       shape=shapes, dtype=st.sampled_from(DTYPES), base_dtype=base_dtypes, scale=scales,
       zero_frac=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16), bad_step=st.sampled_from([-1, -1, 2]))
def test_ef_stream_lock_step(name, group_size, shape, dtype, base_dtype, scale, zero_frac, seed, bad_step):
    run_stream(name, group_size, "ef", shape, dtype, base_dtype, scale, zero_frac, seed, bad_step)


@settings(derandomize=True, deadline=None, max_examples=20, database=None)
@given(name=st.sampled_from(CODECS), mode=st.sampled_from(["none", "delta", "ef2"]),
       group_size=st.sampled_from([3, 4, 16, 128]), shape=shapes, dtype=st.sampled_from(DTYPES),
       base_dtype=base_dtypes, scale=st.sampled_from([1.0, 6.5e4, 1e30]), seed=st.integers(0, 2**16),
       bad_step=st.sampled_from([-1, 2]))
def test_other_modes_lock_step(name, mode, group_size, shape, dtype, base_dtype, scale, seed, bad_step):
    run_stream(name, group_size, mode, shape, dtype, base_dtype, scale, 0.1, seed, bad_step)


@pytest.mark.parametrize("name", CODECS)
def test_aligned_large_layout(name):
    """The one-pass layout of real activations (``C`` a multiple of 8, groups of 128), 4 steps."""
    run_stream(name, 128, "ef", (16, 384), torch.bfloat16, None, 1.0, 0.0, 7, -1, steps=4)


def test_encode_step_matches_codec_encode():
    """The payload is the torch codec's own ``encode`` of the clean residual (header included)."""
    codec = build_compressor({"name": "int4", "group_size": 16})
    x = torch.randn(5, 48, device=DEVICE)
    base = torch.randn(5, 48, device=DEVICE)
    step = group.encode_step(codec, "ef", x, base)
    expected = codec.encode(x.float() - base.float())
    assert_same(step.payload, expected, "payload")
    assert step.payload[:2].tolist() == [ord("C"), ord("H")]
    assert not bool(step.flag) and int(step.payload[FLAGS_BYTE]) == 0


def test_flag_byte_and_nan_output():
    codec = build_compressor("int2")
    x = torch.randn(4, 256, device=DEVICE)
    x[1, 3] = float("inf")
    step = group.encode_step(codec, "ef", x, torch.zeros_like(x))
    assert bool(step.flag) and int(step.payload[FLAGS_BYTE]) == 1
    send = torch_channel(codec, "ef", None)
    send.encode(torch.zeros_like(x), True)
    _, recon = channel.encode(send, x)
    assert torch.isnan(recon).all() and torch.isfinite(send.base).all()


def test_decode_of_a_payload_at_an_odd_offset():
    """A payload cut out of a gathered buffer may start at any byte."""
    codec = build_compressor({"name": "int4", "group_size": 32})
    x = torch.randn(3, 64, device=DEVICE)
    base = torch.randn(3, 64, device=DEVICE)
    payload = group.encode_step(codec, "ef", x, base).payload
    buf = torch.zeros(payload.numel() + 1, dtype=torch.uint8, device=DEVICE)
    buf[1:] = payload
    out = group.decode_step(codec, "ef", buf[1:], (3, 64), torch.float32, base)
    ref = group.decode_step(codec, "ef", payload, (3, 64), torch.float32, base)
    assert_same(out.base, ref.base, "base")


def test_bad_input_raises():
    codec = build_compressor("int8")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        group.encode_step(codec, "ef", torch.ones(4, 4, dtype=torch.int32, device=DEVICE), None)
    with pytest.raises(ValueError, match="needs a float base"):
        group.encode_step(codec, "ef", torch.ones(4, 4, device=DEVICE), None)
    with pytest.raises(ValueError, match="residual mode"):
        group.encode_step(codec, "bogus", torch.ones(4, 4, device=DEVICE), None)
    with pytest.raises(ValueError, match="payload of"):
        group.decode_step(codec, "ef", torch.zeros(8, dtype=torch.uint8, device=DEVICE), (4, 4),
                          torch.float32, torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.use_fused("cuda", codec, DEVICE, (4, 4))


def test_dispatch():
    cpu = torch.device("cpu")
    assert not kernels.use_fused("auto", build_compressor("int2"), cpu, (4, 8))  # auto: CPU is torch's
    assert not kernels.use_fused("torch", build_compressor("int2"), DEVICE, (4, 8))
    for name in ("fp16", "topk", "nm"):  # no kernels: the torch path, even when forced
        assert not kernels.use_fused("triton", build_compressor(name), DEVICE, (4, 8))
    assert not kernels.use_fused("triton", build_compressor("int2"), DEVICE, (0, 8))
    assert not kernels.use_fused("triton", build_compressor({"name": "int8", "group_size": 20000}), DEVICE, (2, 20000))


def test_without_triton_auto_takes_the_torch_path_and_triton_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if it were not installed
    assert not kernels.triton_available()
    assert not kernels.use_fused("auto", build_compressor("int2"), torch.device("cuda"), (4, 8))
    with pytest.raises(RuntimeError, match="pip install triton"):
        kernels.use_fused("triton", build_compressor("int2"), DEVICE, (4, 8))
    monkeypatch.undo()
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)  # triton there, but compiled kernels only
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.use_fused("triton", build_compressor("int2"), torch.device("cpu"), (4, 8))


FUSED_SOURCES = [channel, common, dispatch, group, sign, _group_kernels, _sign_kernels]
HOST_READS = [r"\.item\(", r"\bbool\(", r"\.cpu\(", r"\.tolist\(", r"torch\.tensor\(", r"\.numpy\(",
              r"torch\.frombuffer\(", r"\.to\(\s*[\"']cpu", r"header_tensor\(", r"\.synchronize\("]


@pytest.mark.parametrize("module", FUSED_SOURCES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_no_host_reads_in_fused_path(module):
    """Code inspection: the fused path never reads a device value on the host, nor copies host data
    to the device per call (on CUDA the lock-step tests also run under sync debug mode)."""
    source = inspect.getsource(module)
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())  # comments may name them
    code = re.sub(r'"""(.|\n)*?"""', "", code)  # and so may docstrings
    found = [p for p in HOST_READS if re.search(p, code)]
    assert not found, f"{Path(module.__file__).name} reads device values on the host: {found}"



PTX_CHECK = """
import json, os, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from compact_hooks.kernels import _group_kernels, _sign_kernels, common

POINTERS = {"hdr_ptr": "*i32", "code_ptr": "*u8", "flag_ptr": "*i32", "flag_byte_ptr": "*u8", "abs_ptr": "*fp32",
            "limit": "fp32"}
KINDS = dict(X_KIND=2, B_KIND=1, MODE=3, HAS_VEL=True, WRITE_RECON=True, S_KIND=2)
CASES = {
    "group_tile": (_group_kernels.group_tile_kernel,
                   dict(KINDS, DECODE=False, PACK=True, BITS=2, BLOCK_G=16, GPB=32, PER_BYTE=4)),
    "group_tile_decode": (_group_kernels.group_tile_kernel,
                          dict(KINDS, DECODE=True, PACK=False, BITS=4, BLOCK_G=16, GPB=64, PER_BYTE=2)),
    "flat": (_group_kernels.flat_kernel, dict(KINDS, DECODE=False, BITS=4, BLOCK=1024, PER_BYTE=2)),
    "sign_encode": (_sign_kernels.sign_pack_kernel, dict(KINDS, DECODE=False, CODEBOOK=1, BLOCK=512, PER_BYTE=4)),
}
found = {}
for case, (fn, constexprs) in CASES.items():
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "*i16" if n.endswith("_ptr") else "i32")
                 for n in fn.arg_names}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = common.launch_options()
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    found[case] = {"memory": "ld.global" in ptx and "st.global" in ptx,
                   "fma": re.findall(r"\\b(?:fma\\.rn|mad)\\.f32", ptx)[:3],
                   "approx": re.findall(r"div\\.(?:full|approx)\\.f32|rcp\\.approx", ptx)[:3],
                   "ftz": ".ftz." in ptx, "div_rn": "div.rn.f32" in ptx}
print(json.dumps(found))
"""


def test_compiled_kernels_round_like_torch():
    """Compiled for an H100/H200 (sm_90) with the fused path's launch options, by Triton's own
    compiler and bundled ptxas (no GPU needed, so in a subprocess without the interpreter): no fused
    multiply-add (each product is rounded before it is added, as in the torch codecs), no
    approximate division, no flush-to-zero."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", PTX_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for case, found in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert found["memory"], f"{case}: the PTX has no global loads and stores: not the kernel"
        assert found["fma"] == [], f"{case}: contracted multiply-add in the PTX: {found['fma']}"
        assert found["approx"] == [] and not found["ftz"], f"{case}: approximate or flush-to-zero arithmetic: {found}"
        if case in ("group_tile", "flat"):
            assert found["div_rn"], f"{case}: 1/scale must be the IEEE division div.rn.f32"


def test_config_key_routes_session_channels(monkeypatch):
    """``kernels`` in the config reaches every channel; a fused session and a torch session exchange
    the same payloads and hold the same bases through Session/Channel (warm-up, then residuals)."""
    from compact_hooks.config import load_config
    from compact_hooks.errors import ConfigError
    from compact_hooks.residual import Session

    assert load_config({"kernels": "triton"}).kernels == "triton" and load_config(None).kernels == "auto"
    with pytest.raises(ConfigError, match="kernels"):
        load_config({"kernels": "cuda"})
    import compact_hooks.residual as residual

    calls = []
    for name in ("channel_encode", "channel_decode"):
        real = getattr(residual, name)
        monkeypatch.setattr(residual, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    fused = Session.from_config({"compressor": "int2", "kernels": "triton"})
    ref = Session.from_config({"compressor": "int2", "kernels": "torch"})
    xs = make_stream(3, (8, 256), torch.bfloat16, 3, 1.0, 0.0, -1)
    for x in xs:
        payloads = []
        for session in (fused, ref):
            full = session.prepare("blk:k", tuple(x.shape), x.dtype)
            payloads.append(session.channel("blk:k", 0).encode(x, full)[0])
            session.channel("blk:k", 1).decode(payloads[-1], tuple(x.shape), x.dtype, full)
        assert_same(payloads[0], payloads[1], "payload")
    assert fused.channel("blk:k", 0).kernels == "triton"
    assert calls == ["channel_encode", "channel_decode"] * 3  # the 3 residual steps of the fused session only
    assert fused.base_digests() == ref.base_digests()
    with pytest.raises(ValueError, match="kernels must be one of"):
        Session(build_compressor("int2"), kernels="gpu")


def mixed_paths_worker(rank: int, world: int) -> dict:
    """Every collective with rank 0 on the fused kernels and the others on the torch codecs, and
    again with every rank on torch: the outputs must be the same bits (hashes), step after step."""
    import hashlib

    import compact_hooks as ch

    out = {}
    for spec in ("int2", {"name": "int4", "group_size": 7}):  # one-pass and two-pass layouts
        for paths in ("mixed", "torch"):
            kernels_setting = "triton" if paths == "mixed" and rank == 0 else "torch"
            hook = ch.CompactHook({"compressor": spec, "kernels": kernels_setting})
            h = hashlib.sha1()
            for step in range(3):
                x = make_stream(10 * rank + step, (4 * world, 40), torch.bfloat16, 0, 1.0, 0.0, -1)[0].cpu()
                for op in ("all_gather", "all_to_all", "all_reduce", "ring_exchange"):
                    got = hook(ch.CollectiveCall(op, x, None, key=op))
                    h.update(bits(got).numpy().tobytes())
                hook.next_step()
            out[(str(spec), paths)] = (h.hexdigest(), hook.session.base_digests())
    return out


def test_collectives_with_fused_and_torch_ranks_agree():
    """Ranks may differ in ``kernels``: the payloads are the same bytes, so gloo collectives give
    the same results and every base stays bit-identical across ranks."""
    if DEVICE.type != "cpu":
        pytest.skip("the gloo processes run the CPU path (the CUDA path is covered above)")
    from tests.distributed import run_ranks

    for rank_out in run_ranks(mixed_paths_worker, 2):
        for spec in ("int2", str({"name": "int4", "group_size": 7})):
            assert rank_out[(spec, "mixed")] == rank_out[(spec, "torch")], spec
