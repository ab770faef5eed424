"""Session-wide test setup (pytest imports this before any test module)."""

import os

import torch

# Without a GPU the fused Triton kernels run under Triton's interpreter. Triton reads the switch once,
# and other packages the suite imports (diffusers, yunchang) may import triton first, so it is set
# here, before any test module is collected, not in tests/test_fused_kernels.py alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
