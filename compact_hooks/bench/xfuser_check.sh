#!/usr/bin/env bash
# GPU check of xDiT (xfuser 0.7) USP through compact_hooks.integrations.xfuser (issue 22 item 4).
# Needs a CUDA build of torch, xfuser 0.7 installed as xfuser installs (pip install xfuser==0.7.0)
# and NGPU >= 2 GPUs (default 2; NCCL needs one GPU per rank). Run from anywhere:
#
#   bash compact_hooks/bench/xfuser_check.sh         # results in out/xfuser_check/ (or $OUT/ when set)
#
# 1. xfuser's usp module imports unpatched (on a CPU-only torch it raises NotImplementedError).
# 2. tests/test_funcol.py, xfuser tests included (gloo ranks, CPU tensors; the CPU import step is a no-op here).
# 3. torchrun on NGPU GPUs, NCCL, bfloat16, 2 attention blocks of 24 heads x 128, 4096 tokens, 8 steps:
#    Ulysses NGPU, then ring NGPU: PassthroughHook bit-identical to the unrouted run, int8 / int2 error
#    feedback's worst-step relative L2 error and compression ratio, unrouted == 0 (one JSON line each).
# Not run on the development machine (no GPU there): the numbers exist only where this ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=${OUT:-out/xfuser_check}
NGPU=${NGPU:-2}
mkdir -p "$DEST"
"$PY" -c "import torch, xfuser.model_executor.layers.usp as u; assert torch.cuda.device_count() >= $NGPU, 'needs $NGPU GPUs'; print(torch.__version__, torch.cuda.get_device_name(), u.__file__)" | tee "$DEST/device.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_funcol.py 2>&1 | tail -5 | tee "$DEST/test_funcol.txt"
for layout in "--ulysses $NGPU --ring 1" "--ulysses 1 --ring $NGPU"; do
  # shellcheck disable=SC2086
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m compact_hooks.bench.xfuser_check $layout \
    2>"$DEST/stderr.txt" | tee -a "$DEST/usp.jsonl"
done
"$PY" - "$DEST/usp.jsonl" <<'PYEOF' | tee "$DEST/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
bad = [r for r in rows if r["unrouted"] or (r["hook"] == "passthrough" and not r["equal"])]
for r in rows:
    print(f"U{r['ulysses']} R{r['ring']} {r['hook']:<12} equal={r['equal']} max_err={r['max_err']:.2e} ratio={r['ratio']}")
print("FAIL" if bad or len(rows) != 6 else "OK")
PYEOF
