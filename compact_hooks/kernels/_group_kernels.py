"""Triton kernels of the group quantizers (``int8``, ``int4``, ``int2``), fused with the channel's
residual and base update. Launched by :mod:`compact_hooks.kernels.group`; the torch codecs in
:mod:`compact_hooks.compressors.quantize` and :class:`compact_hooks.residual.Channel` are the reference.

Exactness rules (every kernel is launched with ``enable_fp_fusion=False``, so no multiply-add is
contracted into an FMA; under ``TRITON_INTERPRET=1`` numpy does each operation on its own):

* all arithmetic in float32, in the torch path's order: ``r = x - pred``; ``s = e * (-1/off)``
  (a multiplication by a power of two rounds like torch's division by ``-off``); ``inv = 1 / s``
  with the IEEE division ``div_rn``; ``t = r * inv`` then ``t + (off + 0.5)``, clamped, truncated;
  decode ``(code - off) * s`` (exact: a small integer times a bfloat16 / float16 value);
* 16-bit values travel as ``int16`` bits: float16 converts with Triton's round-to-nearest-even
  casts, bfloat16 by integer rounding on the float32 bits (the interpreter's own bfloat16 cast
  truncates, so it is never used);
* a stored value is saturated like ``_saturate_``: clamping to the target's finite range before
  rounding gives the same value as rounding to inf and then replacing inf by the largest finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)
F16_MAX = tl.constexpr(65504.0)
BF16_MAX = tl.constexpr(3.3895313892515355e38)

# value kinds (constexpr): 0 float32, 1 float16 bits in int16, 2 bfloat16 bits in int16
# residual modes (constexpr): 0 none, 1 delta, 2 ef, 3 ef2


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    """Load values of ``KIND`` as float32 (exact)."""
    if KIND == 0:
        v = tl.load(ptr + offs, mask=mask, other=0.0)
    elif KIND == 1:
        v = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        v = (bits << 16).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _round_to(v, KIND: tl.constexpr):
    """``v`` rounded to ``KIND`` (nearest even) and saturated to its finite range, as float32."""
    v = tl.where(v != v, 0.0, v)
    if KIND == 0:
        r = tl.minimum(tl.maximum(v, -FLT_MAX), FLT_MAX)
    elif KIND == 1:
        r = tl.minimum(tl.maximum(v, -F16_MAX), F16_MAX).to(tl.float16).to(tl.float32)
    else:
        c = tl.minimum(tl.maximum(v, -BF16_MAX), BF16_MAX)
        bits = c.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits & -65536).to(tl.float32, bitcast=True)
    return r


@triton.jit
def _store_kind(ptr, offs, v, mask, KIND: tl.constexpr):
    """Store float32 ``v``, already representable in ``KIND`` (see :func:`_round_to`)."""
    if KIND == 0:
        tl.store(ptr + offs, v, mask=mask)
    elif KIND == 1:
        tl.store(ptr + offs, v.to(tl.float16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=mask)


@triton.jit
def _store_output(ptr, offs, v, mask, bad, KIND: tl.constexpr, POISON: tl.constexpr):
    """Store a reconstruction; with ``POISON``, all-NaN when ``bad`` (the payload's flag byte), with
    the bits of torch's ``float("nan")`` in each dtype (what ``torch.full`` writes)."""
    if not POISON:
        _store_kind(ptr, offs, v, mask, KIND)
    elif KIND == 0:
        bits = tl.where(bad, 0x7FC00000, v.to(tl.int32, bitcast=True))
        tl.store(ptr + offs, bits.to(tl.float32, bitcast=True), mask=mask)
    elif KIND == 1:
        bits = v.to(tl.float16).to(tl.int16, bitcast=True)
        tl.store(ptr + offs, tl.where(bad, tl.full(bits.shape, 0x7E00, tl.int16), bits), mask=mask)
    else:
        bits = (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
        tl.store(ptr + offs, tl.where(bad, tl.full(bits.shape, 0x7FC0, tl.int16), bits), mask=mask)


@triton.jit
def _flag_of(flag_byte_ptr, DECODE: tl.constexpr):
    """Receivers: whether the payload's flag byte is set (a device read, no host sync)."""
    bad = False
    if DECODE:
        bad = tl.load(flag_byte_ptr) != 0
    return bad


@triton.jit
def _prediction(base_ptr, vel_ptr, offs, mask, B_KIND: tl.constexpr, MODE: tl.constexpr,
                HAS_VEL: tl.constexpr):
    """``(base as float32, predict())`` of :class:`Channel` (``ef2`` adds the velocity; ``none``
    has no base: zeros)."""
    if MODE == 0:
        base = tl.zeros(offs.shape, tl.float32)
    else:
        base = _load_f32(base_ptr, offs, mask, B_KIND)
    pred = base
    if MODE == 3:
        if HAS_VEL:
            pred = base + _load_f32(vel_ptr, offs, mask, B_KIND)
    return base, pred


@triton.jit
def _residual(x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, flag_ptr, offs, valid,
              X_KIND: tl.constexpr, B_KIND: tl.constexpr, MODE: tl.constexpr, HAS_VEL: tl.constexpr,
              WRITE_PREV: tl.constexpr):
    """The clean residual (non-finite entries zeroed, any of them raises ``flag``), ``base`` and
    ``pred`` as float32; ``delta`` also stores the sender's cleaned ``x`` when ``WRITE_PREV``."""
    x = _load_f32(x_ptr, offs, valid, X_KIND)
    base = x
    pred = x
    if MODE == 0:
        r = x
    elif MODE == 1:
        r = x - _load_f32(prev_ptr, offs, valid, X_KIND)
        base = _load_f32(base_ptr, offs, valid, B_KIND)
        pred = base
        if WRITE_PREV:
            _store_kind(out_prev_ptr, offs, tl.where(tl.abs(x) <= FLT_MAX, x, 0.0), valid, X_KIND)
    else:
        base, pred = _prediction(base_ptr, vel_ptr, offs, valid, B_KIND, MODE, HAS_VEL)
        r = x - pred
    finite = tl.abs(r) <= FLT_MAX  # False for NaN and +-inf
    bad = tl.max(tl.where(valid & ~finite, 1, 0), axis=None)
    if bad > 0:
        tl.store(flag_ptr, 1)  # every writer writes 1: a benign race
    r = tl.where(valid & finite, r, 0.0)
    return r, base, pred


@triton.jit
def _apply(dec, base, pred, offs, valid, out_base_ptr, out_vel_ptr, out_recon_ptr, bad,
           X_KIND: tl.constexpr, B_KIND: tl.constexpr, MODE: tl.constexpr, WRITE_RECON: tl.constexpr,
           POISON: tl.constexpr):
    """``Channel._update`` (or, for ``none``, the decoded tensor in the input dtype); a receiver
    (``POISON``) writes its output all-NaN for a flagged payload (never the base)."""
    if MODE == 0:
        _store_output(out_recon_ptr, offs, _round_to(dec, X_KIND), valid, bad, X_KIND, POISON)
    else:
        stored = _round_to(pred + dec, B_KIND)
        _store_kind(out_base_ptr, offs, stored, valid, B_KIND)
        if MODE == 3:
            _store_kind(out_vel_ptr, offs, _round_to(stored - base, B_KIND), valid, B_KIND)
        if WRITE_RECON:
            _store_output(out_recon_ptr, offs, _round_to(stored, X_KIND), valid, bad, X_KIND, POISON)


@triton.jit
def _scale_of(r, limit, OFF: tl.constexpr, S_KIND: tl.constexpr):
    """float32 ``(s, inverse)`` of each group: the signed extreme over the two trailing axes
    times ``-1/off``, clamped to ``limit``, rounded to the scales' wire kind ``S_KIND``."""
    hi = tl.max(r, axis=2, keep_dims=True)
    lo = tl.min(r, axis=2, keep_dims=True)
    hi = tl.max(hi, axis=1, keep_dims=True)
    lo = tl.min(lo, axis=1, keep_dims=True)
    e = tl.where(hi >= -lo, hi, lo)
    s = tl.minimum(tl.maximum(e * (-1.0 / OFF), -limit), limit)
    s32 = _round_to(s, S_KIND)
    inv = _inverse(s32)
    return s32, inv


@triton.jit
def _inverse(s32):
    """``1 / s`` by IEEE division (``div_rn``; Triton's plain ``/`` may be approximate), 0 for 0."""
    nonzero = s32 != 0.0
    one = tl.full(s32.shape, 1.0, tl.float32)
    return tl.where(nonzero, tl.math.div_rn(one, tl.where(nonzero, s32, one)), 0.0)


@triton.jit
def _codes(r, inv, OFF: tl.constexpr, HI: tl.constexpr):
    """``uint8`` codes as int32: ``floor(r * inv + off + 0.5)`` clamped to ``[0, hi]``."""
    t = r * inv
    t = t + (OFF + 0.5)
    t = tl.minimum(tl.maximum(t, 0.0), HI * 1.0)
    return t.to(tl.int32)


@triton.jit
def _write_header(hdr_ptr, h0, h1, h2, h3):
    """Program 0 writes the 16 header bytes as four little-endian int32 words."""
    i = tl.arange(0, 4)
    w = tl.where(i == 0, h0, tl.where(i == 1, h1, tl.where(i == 2, h2, h3)))
    if tl.program_id(0) == 0:
        tl.store(hdr_ptr + i, w.to(tl.int32))


@triton.jit(do_not_specialize=["h0", "h1", "h2", "h3"])
def group_tile_kernel(
    x_ptr, base_ptr, vel_ptr, prev_ptr,
    hdr_ptr, scale_ptr, code_ptr,
    out_base_ptr, out_vel_ptr, out_prev_ptr, out_recon_ptr, flag_ptr, flag_byte_ptr,
    h0, h1, h2, h3,
    n_groups, groups, C, g, limit,
    X_KIND: tl.constexpr, B_KIND: tl.constexpr, MODE: tl.constexpr, HAS_VEL: tl.constexpr,
    WRITE_RECON: tl.constexpr, DECODE: tl.constexpr, PACK: tl.constexpr,
    BITS: tl.constexpr, BLOCK_G: tl.constexpr, GPB: tl.constexpr, PER_BYTE: tl.constexpr, S_KIND: tl.constexpr,
):
    """One program = ``BLOCK_G`` whole groups, as a ``[BLOCK_G, GPB, PER_BYTE]`` tile (``GPB``
    bytes of codes per group row, padded to a power of two).

    Encode with ``PACK`` (groups and rows start on byte boundaries): residual, scales, codes,
    packed bytes and base update in one pass. Encode without ``PACK``: scales and the non-finite
    flag only (:func:`flat_kernel` packs). ``DECODE``: unpack + base update in one pass.
    """
    OFF: tl.constexpr = 1 << (BITS - 1)
    HI: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    q = pid * BLOCK_G + tl.arange(0, BLOCK_G)[:, None, None]
    kb = tl.arange(0, GPB)[None, :, None]
    kk = tl.arange(0, PER_BYTE)[None, None, :]
    k = kb * PER_BYTE + kk
    row = q // groups
    start = row * C + (q - row * groups) * g  # flat index of the group's first value
    size = tl.minimum(g, C - (q - row * groups) * g)
    live = q < n_groups
    valid = live & (k < size)
    offs = start + k
    byte_mask = live & (kb * PER_BYTE < size)
    if DECODE:
        s32 = _load_f32(scale_ptr, q, live, S_KIND)
        packed = tl.load(code_ptr + start // PER_BYTE + kb, mask=byte_mask, other=0).to(tl.int32)
        code = (packed >> (kk * BITS)) & HI
        base, pred = _prediction(base_ptr, vel_ptr, offs, valid, B_KIND, MODE, HAS_VEL)
    else:
        _write_header(hdr_ptr, h0, h1, h2, h3)
        r, base, pred = _residual(x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, flag_ptr, offs, valid,
                                  X_KIND, B_KIND, MODE, HAS_VEL, PACK)
        s32, inv = _scale_of(r, limit, OFF, S_KIND)
        _store_kind(scale_ptr, q, s32, live, S_KIND)
        if PACK:
            code = tl.where(valid, _codes(r, inv, OFF, HI), 0)
            packed = tl.sum(code << (kk * BITS), axis=2, keep_dims=True)
            tl.store(code_ptr + start // PER_BYTE + kb, packed.to(tl.uint8), mask=byte_mask)
    if DECODE or PACK:
        dec = (code - OFF).to(tl.float32) * s32
        _apply(dec, base, pred, offs, valid, out_base_ptr, out_vel_ptr, out_recon_ptr,
               _flag_of(flag_byte_ptr, DECODE), X_KIND, B_KIND, MODE, WRITE_RECON, DECODE)


@triton.jit
def flat_kernel(
    x_ptr, base_ptr, vel_ptr, prev_ptr,
    scale_ptr, code_ptr,
    out_base_ptr, out_vel_ptr, out_prev_ptr, out_recon_ptr, flag_ptr, flag_byte_ptr,
    n, n_bytes, groups, C, g,
    X_KIND: tl.constexpr, B_KIND: tl.constexpr, MODE: tl.constexpr, HAS_VEL: tl.constexpr,
    WRITE_RECON: tl.constexpr, DECODE: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr, PER_BYTE: tl.constexpr, S_KIND: tl.constexpr,
):
    """One program = ``BLOCK`` payload bytes as a ``[BLOCK, PER_BYTE]`` tile in element order, for
    any layout (a byte may hold codes of two groups or two rows). Encode: codes from the scales a
    :func:`group_tile_kernel` pass wrote, packed, and the base update. Decode: unpack + update."""
    OFF: tl.constexpr = 1 << (BITS - 1)
    HI: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    kk = tl.arange(0, PER_BYTE)[None, :]
    e = b * PER_BYTE + kk
    valid = e < n
    row = e // C
    col = e - row * C
    s32 = _load_f32(scale_ptr, row * groups + col // g, valid, S_KIND)
    if DECODE:
        packed = tl.load(code_ptr + b, mask=b < n_bytes, other=0).to(tl.int32)
        code = (packed >> (kk * BITS)) & HI
        base, pred = _prediction(base_ptr, vel_ptr, e, valid, B_KIND, MODE, HAS_VEL)
    else:
        r, base, pred = _residual(x_ptr, base_ptr, vel_ptr, prev_ptr, out_prev_ptr, flag_ptr, e, valid,
                                  X_KIND, B_KIND, MODE, HAS_VEL, True)
        inv = _inverse(s32)
        code = tl.where(valid, _codes(r, inv, OFF, HI), 0)
        packed = tl.sum(code << (kk * BITS), axis=1, keep_dims=True)
        tl.store(code_ptr + b, packed.to(tl.uint8), mask=b < n_bytes)
    dec = (code - OFF).to(tl.float32) * s32
    _apply(dec, base, pred, e, valid, out_base_ptr, out_vel_ptr, out_recon_ptr,
           _flag_of(flag_byte_ptr, DECODE), X_KIND, B_KIND, MODE, WRITE_RECON, DECODE)
