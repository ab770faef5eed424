#!/usr/bin/env bash
# GPU check of the fused Triton codec kernels (issue 15). Run from anywhere on a machine with a CUDA
# GPU, after `make install` (or with PYTHON pointing at an interpreter that has compact-hooks[test]):
#
#   bash compact_hooks/bench/gpu_check.sh            # results in out/gpu_check/ (or $OUT/ when set)
#
# 1. Bit-identity on the GPU: tests/test_fused_kernels.py with compiled kernels on CUDA tensors
#    (TRITON_INTERPRET=0): payload bytes, bases, velocities and outputs of the fused path equal the
#    torch codecs' for multi-step streams in every residual mode, with
#    torch.cuda.set_sync_debug_mode("error") around every fused call (a host sync raises).
#    The torch codec tests run too (tests/test_compressors.py, tests/test_residual.py).
# 2. Speed: `compact-hooks bench codecs --device cuda` per dtype: the codecs' encode/decode times
#    and, for int8/int4/int2/int1/int2cf, one ef channel step (sender encode + receiver decode with
#    the base updates) on the torch path vs the fused kernels, in GB/s against a device-to-device
#    copy of the bytes the step touches.
# 3. Offloaded bases (issue 23, base_device "cpu"): one step of KEYS call sites (Ulysses-like
#    all-to-all chunks, a sender and a receiver channel each) with bases on the GPU and in pinned host
#    memory, bf16 and int8 bases: payloads and reconstructions must be bit-identical to the on-device
#    run; the time per step of each, the offloaded run's GPU window (peak device bytes of the bases)
#    and how much of the copy time the prefetch hides (overlap = 1 - (offloaded - on-device) / copy
#    time of the same bytes at the measured host<->device rate). Results: offload.txt.
#    Not measured on the development machine (no GPU there): the numbers exist only where this ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=${OUT:-out/gpu_check}
SHAPE=${SHAPE:-4096,3072}
mkdir -p "$DEST"
export TRITON_INTERPRET=0  # compiled kernels, not the interpreter the CPU test suite uses

"$PY" - <<'PYEOF' | tee "$DEST/device.txt"
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PYEOF

"$PY" -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py 2>&1 | tee "$DEST/test_fused_kernels.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_compressors.py tests/test_residual.py 2>&1 | tail -3 | tee "$DEST/test_codecs.txt"

for dtype in bfloat16 float16 float32; do
  "$PY" -m compact_hooks.cli bench codecs --device cuda --dtype "$dtype" --shape "$SHAPE" --repeats 30 \
    --compressor int8 --compressor int4 --compressor int2 --compressor int1 --compressor int2cf \
    --json > "$DEST/bench_codecs_$dtype.json"
  "$PY" - "$DEST/bench_codecs_$dtype.json" <<'PYEOF' | tee -a "$DEST/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['dtype']} {r['shape']} on {r['device']}: device copy {r['memcpy_gbps']:.0f} GB/s")
print(f"{'codec':<8} {'torch GB/s':>10} {'fused GB/s':>10} {'x copy':>7} {'speedup':>8}")
for c in r["codecs"]:
    s = c["step"]
    fused = "-" if s["fused_gbps"] is None else f"{s['fused_gbps']:.0f}"
    x = "-" if s["fused_x_floor"] is None else f"{s['fused_x_floor']:.2f}"
    up = "-" if s["speedup"] is None else f"{s['speedup']:.1f}"
    print(f"{c['name']:<8} {s['torch_gbps']:>10.0f} {fused:>10} {x:>7} {up:>8}")
PYEOF
done
"$PY" - <<'PYEOF' | tee "$DEST/offload.txt"
import time, torch
from compact_hooks.residual import Session
from compact_hooks.registry import build_compressor

KEYS, STEPS, SHAPE = 40, 6, (9450, 640)  # Wan2.1-14B 720p on 8 GPUs: one peer's Q chunk
dev = torch.device("cuda")
xs = [torch.randn(SHAPE, device=dev, dtype=torch.bfloat16) for _ in range(KEYS)]

def run(base_dtype, base_device, record=False):
    s = Session(build_compressor("int2"), "ef", 1, base_dtype, base_device=base_device, kernels="torch")
    out, times = [], []
    for step in range(STEPS):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for k in range(KEYS):
            x = xs[k] * (1 + 0.01 * step)
            full = s.prepare(f"k{k}", SHAPE, x.dtype)
            p, r = s.channel(f"k{k}", 0, 1).encode(x, full)
            y = s.channel(f"k{k}", 1, 0).decode(p, SHAPE, x.dtype, full)
            if record and step == STEPS - 1:
                out.append((p.cpu(), r.cpu(), y.cpu()))
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
        s.next_step()
    return out, min(times[2:]), s

host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True); d = torch.empty_like(host, device=dev)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(5): d.copy_(host, non_blocking=True); host.copy_(d, non_blocking=True)
torch.cuda.synchronize(); rate = 2 * 5 * host.numel() / (time.perf_counter() - t0)
print(f"{torch.cuda.get_device_name()}: pinned host<->device {rate / 1e9:.1f} GB/s")
print(f"{'bases':<8} {'device s/step':>13} {'offload s/step':>14} {'GPU window MB':>13} {'host MB':>8} {'copy s':>7} {'overlap':>8} identical")
for bd in ("bfloat16", "int8"):
    ref, t_dev, s_dev = run(bd, "input", True)
    got, t_off, s_off = run(bd, "cpu", True)
    same = all(all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(u, v)) for u, v in zip(ref, got))
    copy_s = 2 * s_off.host_memory_bytes() / rate  # every base in and out once per step
    overlap = 1 - max(0.0, t_off - t_dev) / copy_s
    print(f"{bd:<8} {t_dev:>13.4f} {t_off:>14.4f} {s_off.window_peak_bytes() / 1e6:>13.1f} "
          f"{s_off.host_memory_bytes() / 1e6:>8.1f} {copy_s:>7.4f} {overlap:>8.2f} {same}")
    assert same, f"offloaded {bd} bases changed the payloads"
PYEOF
echo "results in $DEST"
