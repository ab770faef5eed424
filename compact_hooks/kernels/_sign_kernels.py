"""Triton kernels of the CompactFusion sign codecs (``int1``, ``int2cf``), fused with the channel's
residual and base update; the exactness rules are those of :mod:`._group_kernels`.

The separable scales are means over whole rows and columns. Their float sums are left to the very
torch code of the codec (``_SeparableSign._scales``) on a tensor of ``|residual|`` this module
writes bit-identically, so the scales match the torch codec's bit for bit on any device (a sum in
another order would round differently). Hence two kernels per encode: :func:`sign_abs_kernel`
(residual, flag, ``|r|``), then, after the torch reductions, :func:`sign_pack_kernel` (codes,
packing, header, base update). Decode is one :func:`sign_pack_kernel` pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._group_kernels import _apply, _flag_of, _load_f32, _prediction, _residual, _store_kind, _write_header


@triton.jit
def sign_abs_kernel(
    x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, abs_ptr, flag_ptr, n,
    X_KIND: tl.constexpr, B_KIND: tl.constexpr, A_KIND: tl.constexpr, MODE: tl.constexpr,
    HAS_VEL: tl.constexpr, BLOCK: tl.constexpr,
):
    """``|clean residual|`` in ``A_KIND`` (float32, or the input's kind for mode ``none``) and the
    non-finite flag."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    valid = e < n
    r, base, pred = _residual(x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, flag_ptr, e, valid,
                              X_KIND, B_KIND, MODE, HAS_VEL, False)
    _store_kind(abs_ptr, e, tl.abs(r), valid, A_KIND)


@triton.jit(do_not_specialize=["h0", "h1", "h2", "h3"])
def sign_pack_kernel(
    x_ptr, base_ptr, vel_ptr, prev_ptr,
    hdr_ptr, ch_ptr, tok_ptr, code_ptr,
    out_base_ptr, out_vel_ptr, out_prev_ptr, out_recon_ptr, flag_ptr, flag_byte_ptr,
    h0, h1, h2, h3, n, n_bytes, C,
    X_KIND: tl.constexpr, B_KIND: tl.constexpr, MODE: tl.constexpr, HAS_VEL: tl.constexpr,
    WRITE_RECON: tl.constexpr, DECODE: tl.constexpr, CODEBOOK: tl.constexpr,
    BLOCK: tl.constexpr, PER_BYTE: tl.constexpr, S_KIND: tl.constexpr,
):
    """One program = ``BLOCK`` payload bytes as a ``[BLOCK, PER_BYTE]`` tile in element order.
    ``CODEBOOK`` 0 (``int1``): code = sign bit, level +-1. ``CODEBOOK`` 1 (``int2cf``): code =
    (|r| > 1.25 t) << 1 | sign bit, levels +-0.5, +-2; ``t = token_scale * channel_scale``."""
    BITS: tl.constexpr = 8 // PER_BYTE
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    kk = tl.arange(0, PER_BYTE)[None, :]
    e = b * PER_BYTE + kk
    valid = e < n
    row = e // C
    col = e - row * C
    ch = _load_f32(ch_ptr, col, valid, S_KIND)  # the channel scales' wire kind
    tok = _load_f32(tok_ptr, row, valid, 1)
    if DECODE:
        packed = tl.load(code_ptr + b, mask=b < n_bytes, other=0).to(tl.int32)
        code = (packed >> (kk * BITS)) & ((1 << BITS) - 1)
        base, pred = _prediction(base_ptr, vel_ptr, e, valid, B_KIND, MODE, HAS_VEL)
    else:
        _write_header(hdr_ptr, h0, h1, h2, h3)
        r, base, pred = _residual(x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, flag_ptr, e, valid,
                                  X_KIND, B_KIND, MODE, HAS_VEL, True)
        code = (r.to(tl.int32, bitcast=True) >> 31) & 1  # torch.signbit
        if CODEBOOK == 1:
            threshold = tok * (ch * 1.25)
            code = code | (tl.where(tl.abs(r) > threshold, 1, 0) << 1)
        code = tl.where(valid, code, 0)
        packed = tl.sum(code << (kk * BITS), axis=1, keep_dims=True)
        tl.store(code_ptr + b, packed.to(tl.uint8), mask=b < n_bytes)
    if CODEBOOK == 0:
        level = 1.0 - 2.0 * code.to(tl.float32)
    else:
        magnitude = tl.where(code >= 2, 2.0, 0.5)
        level = tl.where((code & 1) != 0, -magnitude, magnitude)
    dec = (level * tok) * ch
    _apply(dec, base, pred, e, valid, out_base_ptr, out_vel_ptr, out_recon_ptr,
           _flag_of(flag_byte_ptr, DECODE), X_KIND, B_KIND, MODE, WRITE_RECON, DECODE)
