"""The small per-token operations of a Llama-architecture decode step, each one kernel launch instead of several.

At batch 1 a decode step is a few hundred launches: once the weights are 4-bit, the RMSNorm, RoPE, cache writes and
SwiGLU between the matmuls cost as much as the matmuls. Each function here has a Triton kernel (CUDA, or CPU under
Triton's interpreter) and a plain PyTorch path with the Hugging Face models' arithmetic, chosen by `use_triton`.
"""
from __future__ import annotations

import importlib.util

import torch
from torch.nn import functional as F

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        h = tl.load(h_ptr + row * H + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            h = h + tl.load(d_ptr + row * H + offs, mask=mask, other=0.0)
            tl.store(h_ptr + row * H + offs, h, mask=mask)
        x = h.to(tl.float32)
        r = x * tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * H + offs, w * r.to(h.dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, stride_row, T,
                           NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        half = tl.arange(0, D // 2)
        pos = tl.load(pos_ptr)
        c = tl.load(cos_ptr + pos * D + half).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + half).to(tl.float32)
        base = qkv_ptr + b * stride_row + head * D
        x1 = tl.load(base + half)
        x2 = tl.load(base + D // 2 + half)
        o1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(x1.dtype)
        o2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(x1.dtype)
        if head < NH:  # a query head: rotated in place
            tl.store(base + half, o1)
            tl.store(base + D // 2 + half, o2)
        else:  # a key head: rotated into the cache, with its value head beside it
            kv = head - NH
            slot = ((b * KVH + kv) * T + pos) * D
            tl.store(kc_ptr + slot + half, o1)
            tl.store(kc_ptr + slot + D // 2 + half, o2)
            full = tl.arange(0, D)
            v = tl.load(qkv_ptr + b * stride_row + (NH + KVH + kv) * D + full)
            tl.store(vc_ptr + slot + full, v)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row * 2 * inter + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
        a = (g / (1.0 + tl.exp(-g))).to(u.dtype)
        tl.store(out_ptr + row * inter + offs, a * u, mask=mask)


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                use_triton: bool) -> torch.Tensor:
    """``h += delta`` (in place, the residual stream) and return RMSNorm(h) * weight; h is [rows, H]."""
    if not use_triton:
        if delta is not None:
            h.add_(delta)
        x = h.float()
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    rows, hidden = h.shape
    out = torch.empty_like(h)
    _add_rmsnorm_kernel[(rows,)](h, delta if delta is not None else h, weight, out, hidden, eps,
                                 HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(hidden))
    return out


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   use_triton: bool) -> torch.Tensor:
    """Rotate the query and key heads of ``qkv`` ([B, (heads + 2 kv_heads) * D]) for position `pos` ([1]); write the
    key and value into the caches ([B, kv_heads, T, D]) at `pos`; return the rotated queries [B, heads, D]."""
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    if not use_triton:
        q, k, v = qkv.view(b, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # [1, D]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return x * c + torch.cat((-x2, x1), dim=-1) * s

        k_cache.index_copy_(2, pos, rotate(k).unsqueeze(2))
        v_cache.index_copy_(2, pos, v.unsqueeze(2))
        return rotate(q)
    _rope_cache_kernel[(b, heads + kv_heads)](qkv, cos, sin, pos, k_cache, v_cache, qkv.stride(0),
                                              k_cache.shape[2], NH=heads, KVH=kv_heads, D=d)
    return qkv.view(b, heads + 2 * kv_heads, d)[:, :heads]


def silu_mul(gate_up: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` for ``gate_up = [gate | up]`` ([B, 2 I]) -> [B, I]."""
    rows, two = gate_up.shape
    inter = two // 2
    if not use_triton:
        g, u = gate_up.split(inter, dim=-1)
        return F.silu(g) * u
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out
