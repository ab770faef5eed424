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
echo "results in $DEST"
