"""Fused dequantize-GEMM in Triton: ``y = x @ dequant(W)`` reading the packed low-bit weights once.

One kernel, two regimes chosen by its block shape:
- ``BLOCK_M == 1`` (decode, GEMV-like, memory-bound): each program keeps a [SUB, BLOCK_N] fp32 accumulator and
  reduces it once at the end, so the inner loop is dequantize + FMA with no cross-thread reductions;
- ``BLOCK_M >= 16`` (batches, prefill): tensor-core ``tl.dot`` of activation slabs with dequantized weight slabs.
Split-K spreads the input dimension over programs when the output is too narrow to fill the GPU; partial sums are
added atomically into an fp32 buffer. Which block shape, split and warp count is fastest depends on the card and the
shape, so `tuned_config` measures the candidates once per (batch bucket, shape) on the device.

Importing this module needs Triton; kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import SUB, KernelWeight


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
                M, N, K, group_size, tiles_per_split, stride_xm, stride_om,
                BITS: tl.constexpr, SUBR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
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
    if BLOCK_M == 1:
        acc = tl.zeros((SUBR, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        # The last split may run past the end: such tiles load nothing (rows >= K are masked below).
        t = t_start + i
        words = tl.load(w_ptr + (t * SUBR + offs_r)[:, None] * N + offs_n[None, :],
                        mask=n_mask[None, :] & (t < tiles), other=0)
        for j in tl.static_range(PACK):
            row0 = t * SUBR * PACK + j * SUBR
            rows = row0 + offs_r
            k_mask = rows < K
            g = row0 // group_size
            sz_mask = n_mask & (row0 < K)
            s = tl.load(s_ptr + g * N + offs_n, mask=sz_mask, other=0.0)
            z = tl.load(z_ptr + g * N + offs_n, mask=sz_mask, other=0.0)
            q = ((words >> (j * BITS)) & MASK).to(s.dtype)
            w = (q - z[None, :]) * s[None, :]
            if HAS_PERM:
                cols = tl.load(perm_ptr + rows, mask=k_mask, other=0)
            else:
                cols = rows
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + pid_m * stride_xm + cols, mask=k_mask, other=0.0)
                acc += xv.to(tl.float32)[:, None] * w.to(tl.float32)
            else:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                acc += tl.dot(xv, w.to(xv.dtype))
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = acc
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0)
        res += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, res, mask=out_mask)
    else:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __str__(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.split_k}w{self.num_warps}s{self.num_stages}"


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
                 config: Config | None = None) -> torch.Tensor:
    """``x [..., in] @ dequant(W) [in, out] (+ bias)`` through the fused kernel; x in float16 or bfloat16."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or tuned_config(m, kw, x.dtype)
    n, k = kw.out_features, kw.in_features
    tiles = -(-k // kw.rows_per_tile)
    split = min(cfg.split_k, tiles)
    per_split = -(-tiles // split)
    split = -(-tiles // per_split)
    atomic = split > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    _qmm_kernel[grid](x2, kw.qweight, kw.scales, kw.zeros, kw.perm if kw.perm is not None else kw.qweight,
                      bias if bias is not None else kw.scales, out,
                      m, n, k, kw.group_size, per_split, x2.stride(0), out.stride(0),
                      BITS=kw.bits, SUBR=SUB, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      HAS_PERM=kw.perm is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if atomic:
        out = out.to(x.dtype)
    return out.view(*lead, n)


def candidates(m: int) -> list[Config]:
    """Configurations worth timing for a batch of `m` rows (decode and small batches: split-K GEMV shapes; larger
    batches: tensor-core tiles)."""
    out: list[Config] = []
    if m <= 4:
        for bn in (64, 128, 256):
            for split in (1, 2, 4, 8, 16):
                out.append(Config(1, bn, split, 4 if bn <= 128 else 8))
    if m >= 2:
        bms = [16] if m <= 16 else [16, 32, 64] if m <= 64 else [64, 128]
        for bm in bms:
            for bn in (64, 128, 256):
                for split in (1, 2, 4, 8):
                    if bm * bn <= 128 * 128:
                        out.append(Config(bm, bn, split, 4, 3))
    return out


def default_config(m: int) -> Config:
    return Config(1, 64, 4) if m <= 2 else Config(16 if m <= 16 else 64, 64, 1 if m > 16 else 4, 4, 3)


_TUNED: dict[tuple, Config] = {}


def bucket(m: int) -> int:
    b = 1
    while b < m and b < 128:
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
    cfg = tune(bucket(m), kw, dtype)[0][0]
    _TUNED[key] = cfg
    return cfg


def tune(m: int, kw: KernelWeight, dtype: torch.dtype, configs: list[Config] | None = None,
         rep_ms: int = 10) -> list[tuple[Config, float]]:
    """Time each candidate (median µs, L2 flushed between runs) on random activations of `m` rows; fastest first."""
    from triton.testing import do_bench

    x = torch.randn(m, kw.in_features, dtype=dtype, device=kw.qweight.device)
    timed = []
    for cfg in configs or candidates(m):
        try:
            ms = do_bench(lambda c=cfg: quant_matmul(x, kw, config=c), warmup=5, rep=rep_ms, return_mode="median")
        except Exception:  # a configuration the compiler rejects (e.g. out of shared memory) is simply not a choice
            continue
        timed.append((cfg, ms * 1000))
    timed.sort(key=lambda p: p[1])
    return timed
