"""Low-rank residuals: ``lowrank`` (randomized subspace iteration, optional warm start)."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_compressor
from ..wire import from_bytes, pack_bits, packed_nbytes, unpack_bits
from .base import Compressor, numel_of
from .quantize import FP16_MAX, Grid, aligned, grid_codes, grid_decode_into, grid_scales, matrix_dims, signed_extreme

MAX_RANK = 4096  # beyond this a low-rank payload is no longer small
MAX_ITERS = 64  # more subspace iterations stop improving the basis and only cost time
FACTOR_BITS = (16, 8, 4)
SEED = 0x5EED


def _orth(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``a`` (Householder QR: orthonormal even if ``a`` is
    rank deficient)."""
    return torch.linalg.qr(a, mode="reduced").Q


@register_compressor("lowrank")
class LowRankCompressor(Compressor):
    """``x`` as a matrix ``[T, C]`` (T = product of leading dims, C = last dim) is sent as
    ``s * P @ Q^T`` with ``P [T, r]``, ``Q [C, r]`` found by ``iters`` rounds of randomized
    subspace iteration in float32 on ``x / s`` (``s`` = max |x|, so any input range works).
    Singular values are split evenly between P and Q (balanced columns). The rank used is
    ``min(rank, T, C)``; missing columns are zero, so the size only depends on the shape.

    With ``warm_start=True`` and a channel ``state`` dict, the iteration starts from
    ``state["basis"]`` (an orthonormal ``[C, r]`` from the previous step, when its shape fits) and
    writes the new one back; otherwise it starts from a fixed seeded Gaussian (reproducible).

    Wire layout after the header (factors stored transposed, one row per rank vector)::

        s          float32 [1]
        factor_bits == 16:  P^T float16 [r * T] | Q^T float16 [r * C]
        factor_bits 8 / 4:  P scales float16 [r] | Q scales float16 [r] |
                            codes of P^T then Q^T on quantize.Grid, packed [r * (T + C)]
    """

    def __init__(self, rank: int = 32, iters: int = 2, factor_bits: int = 16, warm_start: bool = False) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer in 1..{MAX_RANK}; got {rank!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
            raise ValueError(f"iters (subspace iterations) must be an integer in 0..{MAX_ITERS}; got {iters!r}")
        if isinstance(factor_bits, bool) or factor_bits not in FACTOR_BITS:
            raise ValueError(f"factor_bits must be one of {FACTOR_BITS}; got {factor_bits!r}")
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be true or false; got {warm_start!r}")
        self.rank = rank
        self.iters = iters
        self.factor_bits = factor_bits
        self.warm_start = warm_start
        self._grid = Grid(factor_bits) if factor_bits < 16 else None
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "iters": self.iters, "factor_bits": self.factor_bits,
                "warm_start": self.warm_start}

    def body_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        if numel_of(shape) == 0:
            return 0
        tokens, channels = matrix_dims(shape)
        count = self.rank * (tokens + channels)
        if self.factor_bits == 16:
            return 4 + 2 * count
        return 4 + 4 * self.rank + packed_nbytes(count, self.factor_bits)

    # -- encode --------------------------------------------------------------------------------
    def _initial_basis(self, channels: int, r: int, x: torch.Tensor,
                       state: dict[str, Any] | None) -> torch.Tensor:
        if self.warm_start and state is not None:
            basis = state.get("basis")
            if (isinstance(basis, torch.Tensor) and basis.shape == (channels, r)
                    and basis.device == x.device and basis.dtype == torch.float32):
                return basis
        gen = torch.Generator(device=x.device)
        gen.manual_seed(SEED)
        return torch.randn(channels, r, generator=gen, device=x.device, dtype=torch.float32)

    def encode_body(self, x: torch.Tensor, state: dict[str, Any] | None) -> list[torch.Tensor]:
        if x.numel() == 0:
            return []
        tokens, channels = matrix_dims(tuple(x.shape))
        r = min(self.rank, tokens, channels)
        x2 = x.reshape(tokens, channels)
        s = signed_extreme(x2.reshape(-1), dim=0).float().abs_()
        s = torch.nan_to_num(s, nan=0.0, posinf=torch.finfo(torch.float32).max)
        inv = torch.where(s > 0, s.reciprocal(), torch.zeros_like(s))
        a = torch.mul(x2, inv.reshape(1, 1))  # float32 (a 0-d factor would keep x's dtype), |a| <= 1

        q = self._initial_basis(channels, r, x, state)
        for _ in range(self.iters):
            p = _orth(a @ q)
            q = _orth(a.T @ p)
        p = _orth(a @ q)
        q = a.T @ p  # a ~ p @ q.T
        if self.warm_start and state is not None:
            state["basis"] = _orth(q)

        # balance: column j of both factors carries sqrt(sigma_j)
        root = q.norm(dim=0).sqrt_()
        p = p * root
        q = q / torch.where(root > 0, root, torch.ones_like(root))
        pt = p.new_zeros(self.rank, tokens)
        qt = q.new_zeros(self.rank, channels)
        pt[:r] = p.T
        qt[:r] = q.T

        fields: list[torch.Tensor] = [s.reshape(1)]
        if self._grid is None:
            fields += [pt.clamp_(-FP16_MAX, FP16_MAX).half(), qt.clamp_(-FP16_MAX, FP16_MAX).half()]
            return fields
        sp16, invp = grid_scales(signed_extreme(pt), self._grid, torch.float32)
        sq16, invq = grid_scales(signed_extreme(qt), self._grid, torch.float32)
        codes = torch.cat([grid_codes(pt, invp.unsqueeze(1), self._grid).reshape(-1),
                           grid_codes(qt, invq.unsqueeze(1), self._grid).reshape(-1)])
        return fields + [sp16, sq16, pack_bits(codes, self.factor_bits)]

    # -- decode --------------------------------------------------------------------------------
    def decode_body(self, body: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if numel_of(shape) == 0:
            return torch.empty(shape, dtype=dtype, device=body.device)
        body = aligned(body, 4)
        tokens, channels = matrix_dims(shape)
        rank = self.rank
        s = from_bytes(body, torch.float32, 1)
        rest = body[4:]
        if self._grid is None:
            pt = from_bytes(rest, torch.float16, rank * tokens).view(rank, tokens).float()
            qt = from_bytes(rest[2 * rank * tokens:], torch.float16, rank * channels).view(rank, channels).float()
        else:
            scales = from_bytes(rest, torch.float16, 2 * rank).float().unsqueeze(1)
            codes = unpack_bits(rest[4 * rank:], self.factor_bits, rank * (tokens + channels))
            pt = torch.empty(rank, tokens, device=body.device)
            qt = torch.empty(rank, channels, device=body.device)
            grid_decode_into(codes[: rank * tokens].view(rank, tokens), scales[:rank], self._grid, pt)
            grid_decode_into(codes[rank * tokens:].view(rank, channels), scales[rank:], self._grid, qt)
        qt = qt * s
        out = pt.T @ qt
        if dtype == torch.float16:
            out.clamp_(-FP16_MAX, FP16_MAX)
        return out.to(dtype).view(shape)
