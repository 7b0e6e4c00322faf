"""Fused dequantize-GEMM in Triton: ``y = x @ dequant(W)`` reading the packed low-bit weights once.

Each program multiplies a [BLOCK_M, K-range] slab of activations with a [K-range, BLOCK_N] block of weights on the
tensor cores, one tile of 32 packed rows at a time (see layout.py): the codes become 16-bit floats by bit
operations alone (no integer-to-float conversion), then ``(q - z) * s`` exactly as the reference computes it. At batch 1
(decode) the rows beyond the batch are masked: the GPU is bound by reading the weights, not by the tensor cores.
Split-K spreads the input dimension over programs when the output is too narrow to fill the GPU; partial sums are
added atomically into an fp32 buffer. Which block shape, split and warp count is fastest depends on the card and the
shape, so `tuned_config` measures the candidates once per (batch bucket, shape) on the device, inside a CUDA graph
with the weights cold in L2 (compressor.kernels.timing): as a decode step runs them. The candidates include the CUDA
C++ tensor-core kernel of cuda_qmm.py for 4-bit weights, which reads the same packed weights.

Importing this module needs Triton; kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl, reference
from .layout import SUB, KernelWeight, UnsupportedLayout

log = logging.getLogger(__name__)


@triton.jit
def _activations(x_ptr, perm_ptr, offs_m, m_mask, rows, K, stride_xm, HAS_PERM: tl.constexpr):
    """The activations [BLOCK_M, len(rows)] that multiply weight rows `rows` (packed order: through `perm` when
    the weights are stored in activation order); rows past K read zeros."""
    k_mask = rows < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + rows, mask=k_mask, other=0)
    else:
        cols = rows
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None] & k_mask[None, :],
                   other=0.0)


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
                M, N, K, group_size: tl.constexpr, tiles_per_split, stride_xm, stride_om,
                BITS: tl.constexpr, SUBR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MAGIC: tl.constexpr, OFFSET: tl.constexpr, ONE_DOT: tl.constexpr,
                HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, HALF2: tl.constexpr,
                GROUP_SLABS: tl.constexpr, ASM: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, SUBR)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    tiles = tl.cdiv(K, SUBR * PACK)
    t_start = pid_k * tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptrs = w_ptr + offs_r[:, None] * N + offs_n[None, :]
    # The next tile's words are requested before this tile is computed, so a load is always in flight.
    # Masks are built from vectors only (scalar conditions broadcast into them): some Triton versions reject a
    # scalar in a load mask.
    words_next = tl.load(w_ptrs + t_start * SUBR * N, mask=((t_start + 0 * offs_r) < tiles)[:, None] & n_mask[None, :],
                         other=0)
    for i in range(0, tiles_per_split):
        # The last split may run past the end: such tiles load nothing (rows >= K are masked below).
        t = t_start + i
        words = words_next
        more = ((t + 1 + 0 * offs_r) < tiles) & ((i + 1 + 0 * offs_r) < tiles_per_split)
        words_next = tl.load(w_ptrs + (t + 1) * SUBR * N, mask=more[:, None] & n_mask[None, :], other=0)
        if HALF2:
            acc = _mma_tile_h2(acc, words, t, x_ptr, s_ptr, z_ptr, perm_ptr, offs_m, m_mask, offs_n, n_mask, offs_r,
                               N, K, group_size, stride_xm, SUBR, GROUP_SLABS, HAS_PERM, ASM)
        elif ONE_DOT:
            # The whole tile at once: shift j of the words holds rows j*SUB.., so [PACK, SUB, N] is the tile's rows
            # in order; one dequantization, one layout change and one tensor-core product per tile.
            offs_j = tl.arange(0, PACK)
            q = (words[None, :, :] >> (offs_j * BITS)[:, None, None]) & MASK
            row0 = t * SUBR * PACK + offs_j * SUBR
            sz_mask = (row0 < K)[:, None, None] & n_mask[None, None, :]
            sz_off = (row0 // group_size)[:, None, None] * N + offs_n[None, None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
            z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0)
            xv = _activations(x_ptr, perm_ptr, offs_m, m_mask, t * SUBR * PACK + tl.arange(0, SUBR * PACK), K,
                              stride_xm, HAS_PERM)
            if MAGIC != 0:
                h = (q | MAGIC).to(tl.int16).to(xv.dtype, bitcast=True)
                w = (h - (z + OFFSET).to(xv.dtype)) * s.to(xv.dtype)
            else:
                w = (q.to(xv.dtype) - z.to(xv.dtype)) * s.to(xv.dtype)
            acc += tl.dot(xv, tl.reshape(w, (PACK * SUBR, BLOCK_N)))
        else:
            for j in tl.static_range(PACK):
                row0 = t * SUBR * PACK + j * SUBR
                g = row0 // group_size
                sz_mask = n_mask & ((row0 + 0 * offs_n) < K)
                s = tl.load(s_ptr + g * N + offs_n, mask=sz_mask, other=0.0)
                z = tl.load(z_ptr + g * N + offs_n, mask=sz_mask, other=0.0)
                xv = _activations(x_ptr, perm_ptr, offs_m, m_mask, row0 + offs_r, K, stride_xm, HAS_PERM)
                q = (words >> (j * BITS)) & MASK
                if MAGIC != 0:
                    # OFFSET + q by writing q into the mantissa of OFFSET: no integer-to-float conversion, which
                    # runs at a quarter of the rate of the other instructions.
                    h = (q | MAGIC).to(tl.int16).to(xv.dtype, bitcast=True)
                    d = h - (z + OFFSET).to(xv.dtype)[None, :]
                else:
                    d = q.to(xv.dtype) - z.to(xv.dtype)[None, :]
                # (q - z) is a small integer, exact in 16 bits: the tensor cores multiply it exactly, and the
                # group's scale is applied once per output instead of once per weight.
                acc += tl.dot(xv, d) * s.to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask & ((pid_k + 0 * offs_n) == 0), other=0.0)
        acc += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemv_tile(acc, words, t, x_row, s_ptr, z_ptr, perm_ptr, offs_n, n_mask, offs_r, N, K, group_size: tl.constexpr,
               BITS: tl.constexpr, SUBR: tl.constexpr, GROUP_SLABS: tl.constexpr, EVEN_K: tl.constexpr,
               HAS_PERM: tl.constexpr, ASM: tl.constexpr, SWIGLU: tl.constexpr):
    """acc [SUB, BLOCK_N] += the activations times tile `t` of the weights, given its packed `words` [SUB, BLOCK_N]."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    for j in tl.static_range(PACK):
        row0 = t * SUBR * PACK + j * SUBR
        if j % GROUP_SLABS == 0:  # a new group: its scale and zero (folded into S and C below)
            g = row0 // group_size
            sz_mask = n_mask & ((row0 + 0 * offs_n) < K)
            s = tl.load(s_ptr + g * N + offs_n, mask=sz_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=sz_mask, other=0.0).to(tl.float32)
            big = s * (1 << BITS)
            low = big + z * s
        rows = row0 + offs_r
        if HAS_PERM:
            rows = tl.load(perm_ptr + rows, mask=rows < K, other=0)
        xv = _row_activations(x_row, rows, (row0 + offs_r) < K, K, EVEN_K, SWIGLU).to(tl.float32)
        # The code moves into the top of the mantissa of 1.0: f = 1 + q / 2^BITS (a shift and one and-or), and
        # (q - z) * s = f * S - C with S = s * 2^BITS, C = s * (2^BITS + z): one fused multiply-add. C stays
        # below 2^(BITS+1) * s, so its rounding is far below the scale's own precision.
        if 23 - BITS - j * BITS >= 0:
            moved = words << (23 - BITS - j * BITS)
        else:
            moved = words >> (j * BITS + BITS - 23)
        if ASM:  # the compiler emits two logic instructions for (a & b) | c; lop3 does it in one
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [moved, moved * 0 + (MASK << (23 - BITS)), moved * 0 + 0x3F800000],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = (moved & (MASK << (23 - BITS))) | 0x3F800000
        w = bits.to(tl.float32, bitcast=True) * big[None, :] - low[None, :]
        acc += xv[:, None] * w
    return acc


# Two float16 codes per instruction (4-bit codes, float16 activations): a 32-bit word holds 8 codes, and one lop3
# moves two of them (bits 0-3 and 16-19, or 4-7 and 20-23) into the mantissas of a pair of float16 1024.0 (f16x2);
# one more instruction gives both q - z exactly. The pair is rows j and j + 4 of a tile: with groups of 128 rows they
# lie in different groups, so each half of a pair has its own scale and zero.
_H2_MAGIC = tl.constexpr(0x64006400)  # 1024.0 in both halves: 1024 + q for the low nibble of each half
_H2_SIXTEENTH = tl.constexpr(0x2C002C00)  # 1/16 in both halves: (1024 + 16 q) / 16 = 64 + q for the high nibble


@triton.jit
def _pack_h2(lo, hi):
    """float16 pairs as int32: `lo` in the low half (an f16x2's first element)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _half(pair, HIGH: tl.constexpr):
    """One half of int32 f16x2 pairs as float16."""
    if HIGH:
        return ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _h2_groups(s_ptr, z_ptr, row_lo, row_hi, offs_n, n_mask, N, K, group_size: tl.constexpr):
    """Scales [BLOCK_N] (float16) of the groups of rows `row_lo` and `row_hi`, and their zeros as the f16x2 constants
    _h2_codes subtracts: 1024 + z for even pairs, -(64 + z) for odd ones."""
    m_lo = n_mask & ((row_lo + 0 * offs_n) < K)
    m_hi = n_mask & ((row_hi + 0 * offs_n) < K)
    s_lo = tl.load(s_ptr + (row_lo // group_size) * N + offs_n, mask=m_lo, other=0.0).to(tl.float16)
    s_hi = tl.load(s_ptr + (row_hi // group_size) * N + offs_n, mask=m_hi, other=0.0).to(tl.float16)
    z_lo = tl.load(z_ptr + (row_lo // group_size) * N + offs_n, mask=m_lo, other=0.0).to(tl.float16)
    z_hi = tl.load(z_ptr + (row_hi // group_size) * N + offs_n, mask=m_hi, other=0.0).to(tl.float16)
    return s_lo, s_hi, _pack_h2(z_lo + 1024.0, z_hi + 1024.0), _pack_h2(-(z_lo + 64.0), -(z_hi + 64.0))


@triton.jit
def _h2_codes(src, zc, ODD: tl.constexpr, ASM: tl.constexpr):
    """q - z (f16x2, exact) for the codes of `src` at bits 0-3 and 16-19 (ODD: 4-7 and 20-23): lop3, then sub (or
    fma by 1/16 for the high nibbles, which land as 1024 + 16 q)."""
    MASK: tl.constexpr = 0x00F000F0 if ODD else 0x000F000F
    if ASM:
        if ODD:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a; lop3.b32 a, $1, $3, $4, 0xEA; fma.rn.f16x2 $0, a, $5, $2; }", "=r,r,r,r,r,r",
                [src, zc, src * 0 + MASK, src * 0 + _H2_MAGIC, src * 0 + _H2_SIXTEENTH],
                dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a; lop3.b32 a, $1, $3, $4, 0xEA; sub.rn.f16x2 $0, a, $2; }", "=r,r,r,r,r",
            [src, zc, src * 0 + MASK, src * 0 + _H2_MAGIC], dtype=tl.int32, is_pure=True, pack=1)
    a = (src & MASK) | _H2_MAGIC  # the same arithmetic half by half, for Triton's interpreter
    if ODD:
        return _pack_h2((_half(a, False) * 0.0625 + _half(zc, False)).to(tl.float16),
                        (_half(a, True) * 0.0625 + _half(zc, True)).to(tl.float16))
    return _pack_h2((_half(a, False) - _half(zc, False)).to(tl.float16),
                    (_half(a, True) - _half(zc, True)).to(tl.float16))


@triton.jit
def _h2_mul(a, b, ASM: tl.constexpr):
    """a * b for int32 f16x2 pairs, rounded to float16 once."""
    if ASM:
        return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return _pack_h2((_half(a, False) * _half(b, False)).to(tl.float16),
                    (_half(a, True) * _half(b, True)).to(tl.float16))


@triton.jit
def _h2_fma(a, b, c, ASM: tl.constexpr):
    """a * b + c for int32 f16x2 pairs, rounded to float16 once."""
    if ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return _pack_h2((_half(a, False) * _half(b, False) + _half(c, False)).to(tl.float16),
                    (_half(a, True) * _half(b, True) + _half(c, True)).to(tl.float16))


@triton.jit
def _h2_flush(acc, part, s_lo, s_hi, ASM: tl.constexpr):
    """acc (float32) += each half of the f16x2 sums `part` times its group's scale."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $2; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
            "fma.rn.f32 a, a, $3, $1; fma.rn.f32 $0, b, $4, a; }", "=f,f,r,f,f",
            [acc, part, s_lo, s_hi], dtype=tl.float32, is_pure=True, pack=1)
    return acc + _half(part, False).to(tl.float32) * s_lo + _half(part, True).to(tl.float32) * s_hi


@triton.jit
def _split_h2(pair, ASM: tl.constexpr):
    """int32 f16x2 pairs as two float16 tensors (free on the GPU: the halves of a register)."""
    if ASM:
        return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pair],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    return _half(pair, False), _half(pair, True)


@triton.jit
def _gemv_tile_h2(acc, words, t, x_row, s_ptr, z_ptr, perm_ptr, offs_n, n_mask, offs_r, N, K, group_size: tl.constexpr,
                  SUBR: tl.constexpr, GROUP_SLABS: tl.constexpr, EVEN_K: tl.constexpr, HAS_PERM: tl.constexpr,
                  ASM: tl.constexpr, SWIGLU: tl.constexpr):
    """_gemv_tile for 4-bit codes and float16 activations, two codes per instruction: per pair of weights a lop3, a
    sub (or fma) and an fma with the activations.

    Each half of an f16x2 sum collects at most 4 products before it is scaled into the float32 accumulator. The
    activations are divided by 16 first so that 4 products of (q - z) <= 15 stay far from float16's range, as the
    dequantized weights would; the scale is multiplied by 16 in float32 to match (exact: powers of two). A half
    overflows only when 4 activations of one column pair exceed ~17000 in magnitude together."""
    high_words = words >> 8  # codes 2, 3, 6, 7 moved where codes 0, 1, 4, 5 were
    part = words * 0
    for p in tl.static_range(4):  # pair p: codes p and p + 4 of each word, rows p*SUB.. and (p+4)*SUB..
        row_lo = t * SUBR * 8 + p * SUBR
        row_hi = row_lo + 4 * SUBR
        if p % GROUP_SLABS == 0:  # a new group for this pair's rows
            s_lo, s_hi, zc_even, zc_odd = _h2_groups(s_ptr, z_ptr, row_lo, row_hi, offs_n, n_mask, N, K, group_size)
            sc_lo = (s_lo.to(tl.float32) * 16.0)[None, :]
            sc_hi = (s_hi.to(tl.float32) * 16.0)[None, :]
        x2 = _h2_activations(x_row, perm_ptr, row_lo, row_hi, offs_r, K, EVEN_K, HAS_PERM, SWIGLU)[:, None]
        zc = zc_even if p % 2 == 0 else zc_odd
        d = _h2_codes(words if p < 2 else high_words, zc[None, :], p % 2 == 1, ASM)
        part = _h2_fma(d, x2, part, ASM)
        if (p + 1) % GROUP_SLABS == 0 or p == 3:  # the last pair with these scales
            acc = _h2_flush(acc, part, sc_lo, sc_hi, ASM)
            part = words * 0
    return acc


@triton.jit
def _row_activations(x_row, cols, mask, K, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr):
    """The activations at columns `cols` of a row (zeros where not `mask`, unless EVEN_K: all inside). SWIGLU: the
    row is [gate | up] (2 K wide) and the activation is silu(gate) * up, rounded as fused_ops.silu_mul rounds it."""
    if EVEN_K:
        x = tl.load(x_row + cols)
    else:
        x = tl.load(x_row + cols, mask=mask, other=0.0)
    if SWIGLU:
        if EVEN_K:
            up = tl.load(x_row + K + cols)
        else:
            up = tl.load(x_row + K + cols, mask=mask, other=0.0)
        g = x.to(tl.float32)
        x = (g / (1.0 + tl.exp(-g))).to(up.dtype) * up
    return x


@triton.jit
def _h2_activations(x_row, perm_ptr, row_lo, row_hi, offs_r, K, EVEN_K: tl.constexpr, HAS_PERM: tl.constexpr,
                    SWIGLU: tl.constexpr):
    """The f16x2 activation pairs, divided by 16, that multiply rows row_lo + r and row_hi + r (see _gemv_tile_h2);
    EVEN_K: every row is inside K (no mask)."""
    r_lo = row_lo + offs_r
    r_hi = row_hi + offs_r
    if HAS_PERM:
        r_lo = tl.load(perm_ptr + r_lo, mask=r_lo < K, other=0)
        r_hi = tl.load(perm_ptr + r_hi, mask=r_hi < K, other=0)
    x_lo = _row_activations(x_row, r_lo, (row_lo + offs_r) < K, K, EVEN_K, SWIGLU)
    x_hi = _row_activations(x_row, r_hi, (row_hi + offs_r) < K, K, EVEN_K, SWIGLU)
    return _pack_h2((x_lo * 0.0625).to(tl.float16), (x_hi * 0.0625).to(tl.float16))


@triton.jit
def _h2_tile_ahead(t, x_row, perm_ptr, offs_r, K, SUBR: tl.constexpr, HAS_PERM: tl.constexpr, SWIGLU: tl.constexpr):
    """Tile `t`'s four activation pairs (masked: a tile requested ahead may lie past K)."""
    base = t * SUBR * 8
    return (_h2_activations(x_row, perm_ptr, base, base + 4 * SUBR, offs_r, K, False, HAS_PERM, SWIGLU),
            _h2_activations(x_row, perm_ptr, base + SUBR, base + 5 * SUBR, offs_r, K, False, HAS_PERM, SWIGLU),
            _h2_activations(x_row, perm_ptr, base + 2 * SUBR, base + 6 * SUBR, offs_r, K, False, HAS_PERM, SWIGLU),
            _h2_activations(x_row, perm_ptr, base + 3 * SUBR, base + 7 * SUBR, offs_r, K, False, HAS_PERM, SWIGLU))


@triton.jit
def _h2_tile_math(acc, words, s_lo, s_hi, zc_even, zc_odd, x0, x1, x2, x3, ASM: tl.constexpr):
    """_gemv_tile_h2 from operands already in registers, for a tile whose slabs 0-3 share one group and slabs 4-7
    another (groups of 128 rows or more): four f16x2 products, one flush."""
    high_words = words >> 8
    part = _h2_fma(_h2_codes(words, zc_even[None, :], False, ASM), x0[:, None], words * 0, ASM)
    part = _h2_fma(_h2_codes(words, zc_odd[None, :], True, ASM), x1[:, None], part, ASM)
    part = _h2_fma(_h2_codes(high_words, zc_even[None, :], False, ASM), x2[:, None], part, ASM)
    part = _h2_fma(_h2_codes(high_words, zc_odd[None, :], True, ASM), x3[:, None], part, ASM)
    return _h2_flush(acc, part, (s_lo.to(tl.float32) * 16.0)[None, :], (s_hi.to(tl.float32) * 16.0)[None, :], ASM)


@triton.jit
def _mma_tile_h2(acc, words, t, x_ptr, s_ptr, z_ptr, perm_ptr, offs_m, m_mask, offs_n, n_mask, offs_r, N, K,
                 group_size: tl.constexpr, stride_xm, SUBR: tl.constexpr, GROUP_SLABS: tl.constexpr,
                 HAS_PERM: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += activations times tile `t` (4-bit codes, float16) on the tensor cores, two codes
    per instruction: lop3, sub (or fma), mul give the weights (q - z) * s of slabs p and p + 4 rounded as the
    reference rounds them; the halves of each register feed the products of their slabs."""
    high_words = words >> 8
    for p in tl.static_range(4):
        row_lo = t * SUBR * 8 + p * SUBR
        row_hi = row_lo + 4 * SUBR
        if p % GROUP_SLABS == 0:  # a new group for this pair's rows
            s_lo, s_hi, zc_even, zc_odd = _h2_groups(s_ptr, z_ptr, row_lo, row_hi, offs_n, n_mask, N, K, group_size)
            s2 = _pack_h2(s_lo, s_hi)[None, :]
        zc = zc_even if p % 2 == 0 else zc_odd
        w_lo, w_hi = _split_h2(_h2_mul(_h2_codes(words if p < 2 else high_words, zc[None, :], p % 2 == 1, ASM), s2,
                                       ASM), ASM)
        acc += tl.dot(_activations(x_ptr, perm_ptr, offs_m, m_mask, row_lo + offs_r, K, stride_xm, HAS_PERM), w_lo)
        acc += tl.dot(_activations(x_ptr, perm_ptr, offs_m, m_mask, row_hi + offs_r, K, stride_xm, HAS_PERM), w_hi)
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
                 M, N, K, group_size: tl.constexpr, tiles_per_split, stride_xm, stride_om,
                 BITS: tl.constexpr, SUBR: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SLABS: tl.constexpr,
                 EVEN_K: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 HALF2: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr,
                 SWIGLU: tl.constexpr):
    """One row of activations times the weights on the CUDA cores, in float32: the decode case.

    A tensor-core product pads a batch of 1 to 16 rows and rearranges its operand through shared memory; here each
    thread multiplies the weights it unpacked into its own partial sums [SUB, BLOCK_N], and the SUB axis is summed
    once at the end. Per weight: a shift, one and-or, two fused multiply-adds (see below). The group size is a
    compile-time constant: finding a row's group is then a shift, not an integer division per tile. HALF2 (4-bit codes,
    float16 activations): two weights per instruction, about 2 instructions per weight (see _gemv_tile_h2).

    With SPLIT > 1 the programs of one column block add their partial sums into the float32 workspace `ws`; the last
    one to finish (counted in `count`) takes the total, resetting `ws` and `count` to zero for the next call, and
    writes the output: no zero-fill or cast kernel around the launch.

    PDL (a programmatic dependent launch, see pdl.py): the first tile's words are requested before waiting for the
    kernel that wrote the activations.

    AHEAD (HALF2 with one group pair per tile, groups of 128 rows or more): the next tile's scales, zeros and
    activations are requested with its words, so no load waits inside the loop; more instructions per weight and
    more registers, which the tuner weighs on the card.

    SWIGLU: the row is [gate | up] of a down projection, twice K wide, and the activations are silu(gate) * up,
    computed where they are loaded: the SwiGLU kernel's launch saved.
    """
    PACK: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)  # fastest: the rows of a batch share each block of weights while it is in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, SUBR)
    tiles = tl.cdiv(K, SUBR * PACK)
    t_start = pid_k * tiles_per_split
    acc = tl.zeros((SUBR, BLOCK_N), dtype=tl.float32)
    w_ptrs = w_ptr + offs_r[:, None] * N + offs_n[None, :]
    # The next tile's words are requested before this tile is computed, so a load is always in flight (Triton's
    # own software pipeline, num_stages, was measured no faster on the H200).
    words_next = tl.load(w_ptrs + t_start * SUBR * N,
                         mask=((t_start + 0 * offs_r) < tiles)[:, None] & n_mask[None, :], other=0)
    if AHEAD:  # the first tile's scales and zeros (weights too) before the wait, its activations after
        row0 = t_start * SUBR * 8
        s_lo_n, s_hi_n, zc_even_n, zc_odd_n = _h2_groups(s_ptr, z_ptr, row0, row0 + 4 * SUBR, offs_n, n_mask, N, K,
                                                         group_size)
    pid_m += pdl.wait(PDL)  # every activation, output and workspace address depends on pid_m
    x_row = x_ptr + pid_m * stride_xm
    if AHEAD:
        x0_n, x1_n, x2_n, x3_n = _h2_tile_ahead(t_start, x_row, perm_ptr, offs_r, K, SUBR, HAS_PERM, SWIGLU)
    for i in range(0, tiles_per_split):
        t = t_start + i
        words = words_next
        more = ((t + 1 + 0 * offs_r) < tiles) & ((i + 1 + 0 * offs_r) < tiles_per_split)
        words_next = tl.load(w_ptrs + (t + 1) * SUBR * N, mask=more[:, None] & n_mask[None, :], other=0)
        if AHEAD:
            s_lo, s_hi, zc_even, zc_odd, x0, x1, x2, x3 = s_lo_n, s_hi_n, zc_even_n, zc_odd_n, x0_n, x1_n, x2_n, x3_n
            s_lo_n, s_hi_n, zc_even_n, zc_odd_n = _h2_groups(s_ptr, z_ptr, (t + 1) * SUBR * 8,
                                                             (t + 1) * SUBR * 8 + 4 * SUBR, offs_n, n_mask, N, K,
                                                             group_size)
            x0_n, x1_n, x2_n, x3_n = _h2_tile_ahead(t + 1, x_row, perm_ptr, offs_r, K, SUBR, HAS_PERM, SWIGLU)
            acc = _h2_tile_math(acc, words, s_lo, s_hi, zc_even, zc_odd, x0, x1, x2, x3, ASM)
        elif HALF2:
            acc = _gemv_tile_h2(acc, words, t, x_row, s_ptr, z_ptr, perm_ptr, offs_n, n_mask, offs_r, N, K,
                                group_size, SUBR, GROUP_SLABS, EVEN_K, HAS_PERM, ASM, SWIGLU)
        else:
            acc = _gemv_tile(acc, words, t, x_row, s_ptr, z_ptr, perm_ptr, offs_n, n_mask, offs_r, N, K, group_size,
                             BITS, SUBR, GROUP_SLABS, EVEN_K, HAS_PERM, ASM, SWIGLU)
    y = tl.sum(acc, axis=0)
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    if SPLIT == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        ws_ptrs = ws_ptr + pid_m * N + offs_n
        tl.atomic_add(ws_ptrs, y, mask=n_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's sums are in before one thread signals (its release covers them)
        slot = pid_m * tl.num_programs(1) + pid_n
        done = tl.atomic_add(count_ptr + slot + 0 * offs_n, 1 + 0 * offs_n, mask=offs_n == pid_n * BLOCK_N,
                             sem="acq_rel")
        last = tl.max(tl.where(offs_n == pid_n * BLOCK_N, done, -1), axis=0) == SPLIT - 1
        take = n_mask & (last + 0 * offs_n != 0)
        total = tl.atomic_add(ws_ptrs, tl.zeros_like(y), mask=take, sem="acq_rel")  # read where the sums were made
        tl.store(ws_ptrs, tl.zeros_like(y), mask=take)
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=take, other=0.0).to(tl.float32)
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=take)
        tl.store(count_ptr + slot + 0 * offs_n, 0 * offs_n, mask=take & (offs_n == pid_n * BLOCK_N))


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size, BITS: tl.constexpr, SUBR: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Tile `program_id(0)` of the weights, columns of block `program_id(1)`, dequantized into `out` [K, N] in packed
    row order: (q - z) * s rounded once, as the reference rounds it ((q - z) * s is exact in float32)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, SUBR)
    n_mask = offs_n < N
    words = tl.load(w_ptr + (t * SUBR + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    for j in tl.static_range(PACK):
        rows = t * SUBR * PACK + j * SUBR + offs_r
        mask = (rows < K)[:, None] & n_mask[None, :]
        sz = (rows // group_size)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        q = ((words >> (j * BITS)) & MASK).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2
    one_dot: bool = True  # one product per tile (False: one per 32-row slab, the scale applied after it)
    gemv: bool = False  # one activation row per program on the CUDA cores (block_m, one_dot unused)
    half2: bool = True  # 4-bit codes and float16 activations: two weights per dequantizing instruction
    mma: bool = False  # the CUDA C++ kernel (cuda_qmm.py): block_m activation rows per block (8 or 16), num_warps,
    # split_k; num_stages 2: the next tile's weights requested before this one is computed
    min_blocks: int = 1  # mma: blocks per multiprocessor the compiler leaves registers for
    pdl: bool = False  # mma: programmatic dependent launch (sm_90+)
    ahead: bool = False  # gemv: scales, zeros and activations requested a tile ahead (see _gemv_kernel)
    dense: bool = False  # dequantize the whole weight (block_n columns per program), then one cuBLAS product: for
    # batches where the product is bound by arithmetic, not by reading the weights (prefill)

    def __str__(self) -> str:
        if self.dense:
            return f"dense-n{self.block_n}"
        if self.mma:
            return (f"mma-m{self.block_m}k{self.split_k}w{self.num_warps}" + ("" if self.num_stages > 1 else "-s1")
                    + (f"b{self.min_blocks}" if self.min_blocks > 1 else "") + ("-pdl" if self.pdl else ""))
        if self.gemv:
            return (f"gemv-n{self.block_n}k{self.split_k}w{self.num_warps}" + ("" if self.half2 else "-fp32")
                    + ("-ahead" if self.ahead else ""))
        return (f"m{self.block_m}n{self.block_n}k{self.split_k}w{self.num_warps}s{self.num_stages}"
                + ("" if self.one_dot else "-slabs") + ("" if self.half2 or not self.one_dot else "-fp16"))


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
                 config: Config | None = None, swiglu: bool = False) -> torch.Tensor:
    """``x [..., in] @ dequant(W) [in, out] (+ bias)`` through the fused kernel; x in float16 or bfloat16.
    `swiglu` (the GEMV and the CUDA C++ kernel): x is [..., 2 in] = [gate | up], and the product takes
    silu(gate) * up."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, 2 * kw.in_features if swiglu else kw.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or tuned_config(m, kw, x.dtype)
    n, k = kw.out_features, kw.in_features
    tiles = -(-k // kw.rows_per_tile)
    split = min(cfg.split_k, tiles)
    per_split = -(-tiles // split)
    split = -(-tiles // per_split)
    if swiglu and not takes_swiglu(cfg):
        raise UnsupportedLayout(f"{cfg}: only the GEMV and the CUDA C++ kernel take the SwiGLU with the activations")
    if cfg.mma:
        from . import cuda_qmm

        if not cuda_qmm.applies(kw, x.dtype):
            raise UnsupportedLayout(f"{cfg}: the CUDA C++ kernel takes 4-bit weights, float16/bfloat16 activations "
                                    "and a multiple of 8 output columns, on a GPU of compute capability 8.0 or newer")
        return cuda_qmm.quant_matmul(x2, kw, bias, split=split, per_split=per_split, warps=cfg.num_warps,
                                     rows_per_block=cfg.block_m, prefetch=cfg.num_stages > 1,
                                     workspace=lambda sums, blocks: _workspace(x.device, sums, blocks),
                                     min_blocks=cfg.min_blocks, pdl=cfg.pdl, swiglu=swiglu).view(*lead, n)
    if cfg.gemv:
        return _gemv(x2, kw, bias, cfg, split, per_split, swiglu).view(*lead, n)
    if cfg.dense:
        return _dense(x2, kw, bias, cfg).view(*lead, n)
    atomic = split > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    magic, offset = _magic(kw.bits, x.dtype)
    _qmm_kernel[grid](x2, kw.qweight, kw.scales, kw.zeros, kw.perm if kw.perm is not None else kw.qweight,
                      bias if bias is not None else kw.scales, out,
                      m, n, k, kw.group_size, per_split, x2.stride(0), out.stride(0),
                      BITS=kw.bits, SUBR=SUB, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MAGIC=magic, OFFSET=offset,
                      ONE_DOT=cfg.one_dot,
                      HAS_PERM=kw.perm is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
                      HALF2=half2_applies(cfg, kw.bits, x.dtype), GROUP_SLABS=group_slabs(kw),
                      ASM=pdl.nvidia(x.device),
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if atomic:
        out = out.to(x.dtype)
    return out.view(*lead, n)


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, sums: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums and int32 counters for split-K; the kernel leaves them zeroed again. Kept per device
    and size, so a CUDA graph captures the same buffers its warm-up calls allocated."""
    key = (str(device), sums, blocks)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.zeros(sums, dtype=torch.float32, device=device),
                           torch.zeros(blocks, dtype=torch.int32, device=device))
    return _WORKSPACE[key]


def group_slabs(kw: KernelWeight) -> int:
    """How many consecutive 32-row slabs of a tile share their group's scales (the kernels load them once)."""
    return slabs_per_group(kw.bits, kw.group_size if kw.group_size < kw.in_features else 0)


def slabs_per_group(bits: int, group_size: int) -> int:
    """group_slabs for `bits`-bit codes in groups of `group_size` rows (0: one group over the whole input)."""
    per, slabs = 32 // bits, group_size // SUB
    if group_size == 0 or (slabs and slabs % per == 0):
        return per
    return slabs if slabs and per % slabs == 0 else 1


def takes_swiglu(cfg: Config) -> bool:
    """Whether a configuration computes a down projection's SwiGLU as it loads the activations."""
    return cfg.mma or cfg.gemv


def _gemv(x2: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, cfg: Config, split: int,
          per_split: int, swiglu: bool = False) -> torch.Tensor:
    m, n, k = x2.shape[0], kw.out_features, kw.in_features
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    blocks = triton.cdiv(n, cfg.block_n)
    ws, count = _workspace(x2.device, m * n, m * blocks) if split > 1 else (out, kw.qweight)
    on = pdl.allowed(x2.device)
    half2, slabs = half2_applies(cfg, kw.bits, x2.dtype), group_slabs(kw)
    _gemv_kernel[(m, blocks, split)](
        x2, kw.qweight, kw.scales, kw.zeros, kw.perm if kw.perm is not None else kw.qweight,
        bias if bias is not None else kw.scales, out, ws, count,
        m, n, k, kw.group_size, per_split, x2.stride(0), out.stride(0),
        # Unmasked activation loads only where every program's tiles lie inside K: the last split may run past the end.
        BITS=kw.bits, SUBR=SUB, BLOCK_N=cfg.block_n, GROUP_SLABS=slabs,
        EVEN_K=k % kw.rows_per_tile == 0 and (k // kw.rows_per_tile) % per_split == 0,
        HAS_PERM=kw.perm is not None, HAS_BIAS=bias is not None, SPLIT=split,
        HALF2=half2, ASM=pdl.nvidia(x2.device), PDL=on, AHEAD=cfg.ahead and half2 and slabs >= 4, SWIGLU=swiglu,
        num_warps=cfg.num_warps, num_stages=1, launch_pdl=on)
    return out


def _dense(x2: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    n, k = kw.out_features, kw.in_features
    w = torch.empty(k, n, dtype=x2.dtype, device=x2.device)  # in packed row order: the activations follow perm
    _dequant_kernel[(triton.cdiv(k, kw.rows_per_tile), triton.cdiv(n, cfg.block_n))](
        kw.qweight, kw.scales, kw.zeros, w, n, k, kw.group_size, BITS=kw.bits, SUBR=SUB, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps)
    x = x2 if kw.perm is None else x2.index_select(1, kw.perm)
    return x @ w if bias is None else torch.addmm(bias.to(x2.dtype), x, w)


def two_codes_possible(bits: int, dtype: torch.dtype) -> bool:
    """4-bit codes and float16 activations: the only case with two codes per instruction (the GEMV's sums of 4
    products would lose too much in bfloat16)."""
    return bits == 4 and dtype == torch.float16


def half2_applies(cfg: Config, bits: int, dtype: torch.dtype) -> bool:
    """Whether `cfg` dequantizes two codes per instruction (for the tensor cores: with one product per tile)."""
    return cfg.half2 and two_codes_possible(bits, dtype) and (cfg.gemv or cfg.one_dot)


def _magic(bits: int, dtype: torch.dtype) -> tuple[int, float]:
    """Bits of a 16-bit float OFFSET whose mantissa takes any `bits`-bit code exactly (0: convert instead)."""
    if dtype == torch.float16:
        return 0x6400, 1024.0  # 1024 + q, q < 1024
    if dtype == torch.bfloat16 and bits <= 7:
        return 0x4300, 128.0  # 128 + q, q < 128
    return 0, 0.0


GEMV_ROWS = 4  # up to this many activation rows, the CUDA-core kernel is a candidate (it unpacks once per row)
MMA_ROWS = 64  # up to this many, the CUDA C++ kernel (it unpacks the weights once per 16 rows)


def candidates(m: int, bits: int = 4, dtype: torch.dtype = torch.float16) -> list[Config]:
    """Configurations worth timing for a batch of `m` rows: the CUDA-core kernel for one row, both kernels up to
    GEMV_ROWS, the tensor-core kernel (at least 16 rows per tile) beyond."""
    out: list[Config] = []
    if (bits == 4 and dtype in (torch.float16, torch.bfloat16) and m <= MMA_ROWS
            and os.environ.get("COMPRESSOR_CUDA_KERNELS", "1") != "0"):
        # The CUDA C++ kernel (where it applies: tune skips it elsewhere), 8 or 16 activation rows per block.
        rows = 8 if m <= 8 else 16
        splits = (1, 2, 4, 8, 16)
        out += [Config(rows, 32, split, warps, 2, mma=True) for warps in (4, 8) for split in splits]
        out += [Config(rows, 32, split, 4, 2, mma=True, min_blocks=4) for split in splits]  # 16 warps resident
        # 2 warps: short inputs split into blocks of one or two tiles leave no warp idle (decode of small models)
        out += [Config(rows, 32, split, 2, 2, mma=True, min_blocks=8) for split in (2, 4, 8, 16)]
        # Programmatic dependent launch: the first weights are on their way while the previous kernel finishes
        # (tune drops these where the device or driver refuses them).
        if os.environ.get("COMPRESSOR_CUDA_PDL", "1") != "0":
            out += [Config(rows, 32, split, 4, 2, mma=True, min_blocks=b, pdl=True) for b in (1, 4)
                    for split in splits]
        out += [Config(rows, 32, split, 4, 1, mma=True) for split in (1, 4)]
    if m <= GEMV_ROWS:
        # block columns x warps (8 to 32 partial sums per thread and slab) x split
        for bn, warps in ((16, 1), (32, 2), (64, 2), (64, 4), (128, 4)):
            out += [Config(1, bn, split, warps, 1, gemv=True) for split in (1, 2, 4, 8, 16, 32)]
        if two_codes_possible(bits, dtype):  # the float32 GEMV stays a candidate
            out += [Config(1, 32, split, 2, 1, gemv=True, half2=False) for split in (1, 2, 4, 8, 16, 32)]
            out += [Config(1, bn, split, warps, 1, gemv=True, ahead=True) for bn, warps in ((32, 2), (64, 2), (64, 4))
                    for split in (1, 2, 4, 8)]
        if m == 1:
            return out
    bms = [16] if m <= 16 else [16, 32] if m <= 32 else [32, 64] if m <= 64 else [64, 128]
    tile_rows = SUB * 32 // bits
    for bm in bms:
        for bn in (32, 64, 128, 256):
            for split in (1, 2, 4, 8, 16):
                if bm * bn > 128 * 128 or (split > 4 and m > 16):
                    continue
                if tile_rows * bn <= 256 * 128:  # a dequantized tile beyond this no longer fits in registers
                    out.append(Config(bm, bn, split, 8 if tile_rows * bn >= 256 * 128 else 4, 3))
                if bn in (64, 128) and split in (2, 4, 8):  # the per-slab variant where it came closest
                    out.append(Config(bm, bn, split, 4, 3, one_dot=False))
                if two_codes_possible(bits, dtype) and bn in (64, 128) and split <= 4:
                    out.append(Config(bm, bn, split, 4, 3, half2=False))  # one code per instruction stays a choice
    if m > MMA_ROWS:  # prefill-sized batches: the whole weight dequantized once, then cuBLAS
        out += [Config(0, bn, 1, 4, 1, dense=True) for bn in (64, 128)]
    return out


def default_config(m: int) -> Config:
    if m == 1:
        return Config(1, 64, 4, 4, 1, gemv=True)
    if m >= 256:  # bound by arithmetic: dequantizing once costs little next to the product
        return Config(0, 128, 1, 4, 1, dense=True)
    return Config(16, 64, 4, 4, 3) if m <= 16 else Config(64, 64, 1, 4, 3)


_TUNED: dict[tuple, Config] = {}
TUNING_LOG: dict[tuple, list[tuple[Config, float]]] = {}  # every candidate's µs, fastest first (for benchmarks)


def bucket(m: int) -> int:
    """Batches tuned together: powers of two up to 1024 rows (a prefill of 512 tokens is tuned at 512, where the
    dense path may win and at 128 it may not)."""
    b = 1
    while b < m and b < 1024:
        b *= 2
    return b


def tuned_config(m: int, kw: KernelWeight, dtype: torch.dtype) -> Config:
    """The fastest candidate for this batch bucket and shape, timed once on the device (CUDA only)."""
    key = (bucket(m), kw.in_features, kw.out_features, kw.bits, kw.group_size, kw.perm is not None, dtype)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if kw.qweight.device.type != "cuda" or os.environ.get("COMPRESSOR_KERNEL_TUNING", "1") == "0":
        return default_config(m)
    timed = tune(bucket(m), kw, dtype)
    TUNING_LOG[key] = [(c, round(us, 2)) for c, us in timed]
    cfg = timed[0][0]
    _TUNED[key] = cfg
    return cfg


def tune(m: int, kw: KernelWeight, dtype: torch.dtype, configs: list[Config] | None = None,
         replays: int = 5) -> list[tuple[Config, float]]:
    """Time each candidate (µs per call in a CUDA graph, weights cold in L2) on random activations of `m` rows;
    fastest first."""
    from .timing import copies_for, graph_time_us

    x = torch.randn(m, kw.in_features, dtype=dtype, device=kw.qweight.device)
    weights = [kw] + [KernelWeight(kw.qweight.clone(), kw.scales.clone(), kw.zeros.clone(), kw.perm, kw.bits,
                                   kw.group_size, kw.in_features, kw.out_features)
                      for _ in range(copies_for(kw.nbytes(), most=32) - 1)]
    want = reference.quant_matmul(x, kw).float()
    timed = []
    for cfg in configs or candidates(m, kw.bits, dtype):
        try:
            got = quant_matmul(x, kw, config=cfg).float()
            # A configuration the compiler gets wrong must never win on speed: check it against the reference first.
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if not err < 1e-2:
                log.warning("kernel config %s gives relative error %.2e on %s: not used", cfg, err, tuple(x.shape))
                continue
            us = graph_time_us([lambda w=w, c=cfg: quant_matmul(x, w, config=c) for w in weights], replays)
        except Exception:  # a configuration the compiler rejects (e.g. out of shared memory) is simply not a choice
            continue
        timed.append((cfg, us))
    timed.sort(key=lambda p: p[1])
    return timed
