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

    from . import pdl

    @triton.jit
    def _add_rmsnorm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        row = tl.program_id(0) + pdl.wait(PDL)
        h = tl.load(h_ptr + row * H + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            h = h + tl.load(d_ptr + row * H + offs, mask=mask, other=0.0)
            tl.store(h_ptr + row * H + offs, h, mask=mask)
        x = h.to(tl.float32)
        r = x * tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(out_ptr + row * H + offs, w * r.to(h.dtype), mask=mask)

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, stat_ptr,
                                 stride_row, T, chunk, scale, NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                                 DP: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
                                 PRECISION: tl.constexpr, PDL: tl.constexpr):
        # One program: one key/value head (with the G query heads that share it) over `chunk` cached positions.
        zero = pdl.wait(PDL)
        bk = tl.program_id(0) + zero  # b * KVH + kv: also the cache's [B, KVH] row
        split = tl.program_id(1)
        b = bk // KVH
        kv = bk % KVH
        G: tl.constexpr = NH // KVH
        HALF: tl.constexpr = D // 2
        pos = tl.load(pos_ptr + zero).to(tl.int32)
        d = tl.arange(0, DP)
        dmask = d < D
        # RoPE as x * cos + rotate_half(x) * sin, rotate_half read as a second load at the partner index.
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        pc = tl.minimum(pos, T - 1)  # cos and sin have a row per cache position
        c = tl.load(cos_ptr + pc * D + d, mask=dmask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pc * D + d, mask=dmask, other=0.0).to(tl.float32) * tl.where(d < HALF, -1.0, 1.0)
        row = qkv_ptr + b * stride_row
        g = tl.arange(0, GP)
        gd = (g < G)[:, None] & dmask[None, :]
        qh = row + (kv * G + g)[:, None] * D
        q = tl.load(qh + d[None, :], mask=gd, other=0.0)
        qp = tl.load(qh + partner[None, :], mask=gd, other=0.0)
        q = (q.to(tl.float32) * c[None, :] + qp.to(tl.float32) * s[None, :]).to(q.dtype)

        kbase = kc_ptr + bk * T * D
        vbase = vc_ptr + bk * T * D
        start = split * chunk
        # The cached positions; `pos` itself comes from qkv below. A position past the cache writes nothing and reads
        # nothing outside it (the caller sized the cache; the PyTorch path raises there).
        stop = tl.minimum(tl.minimum(start + chunk, pos), T)
        m = tl.full([GP], float("-inf"), tl.float32)
        den = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for n0 in range(start, stop, BN):
            n = n0 + tl.arange(0, BN)
            nd = (n < stop)[:, None] & dmask[None, :]
            k = tl.load(kbase + n[:, None] * D + d[None, :], mask=nd, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            sc = tl.where((n < stop)[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            v = tl.load(vbase + n[:, None] * D + d[None, :], mask=nd, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        if (pos >= start) & (pos < start + chunk) & (pos < T):
            # This step's key and value: rotated, written to the cache at `pos`, and attended to from registers
            # (so no program reads a cache slot that another writes in the same launch).
            kh = row + (NH + kv) * D
            kn = tl.load(kh + d, mask=dmask, other=0.0)
            knp = tl.load(kh + partner, mask=dmask, other=0.0)
            kn = (kn.to(tl.float32) * c + knp.to(tl.float32) * s).to(kn.dtype)
            vn = tl.load(row + (NH + KVH + kv) * D + d, mask=dmask, other=0.0)
            tl.store(kbase + pos * D + d, kn, mask=dmask)
            tl.store(vbase + pos * D + d, vn, mask=dmask)
            sn = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
            m_new = tl.maximum(m, sn)
            alpha = tl.exp(m - m_new)
            pn = tl.exp(sn - m_new)
            den = den * alpha + pn
            acc = acc * alpha[:, None] + pn.to(vn.dtype).to(tl.float32)[:, None] * vn.to(tl.float32)[None, :]
            m = m_new
        heads = kv * G + g
        if SPLITS == 1:
            o = acc / den[:, None]
            tl.store(out_ptr + b * NH * D + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=gd)
        else:  # partial sums, merged by _attention_combine_kernel (a program past `pos` leaves m = -inf, den = 0)
            slot = (b * NH + heads) * SPLITS + split
            tl.store(part_ptr + slot[:, None] * DP + d[None, :], acc, mask=gd)
            tl.store(stat_ptr + slot * 2, m, mask=g < G)
            tl.store(stat_ptr + slot * 2 + 1, den, mask=g < G)

    @triton.jit
    def _attention_combine_kernel(part_ptr, stat_ptr, out_ptr, D: tl.constexpr, DP: tl.constexpr,
                                  SPLITS: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        bh = tl.program_id(0) + pdl.wait(PDL)  # b * NH + head
        sp = tl.arange(0, SP)
        d = tl.arange(0, DP)
        slot = bh * SPLITS + sp
        m = tl.load(stat_ptr + slot * 2, mask=sp < SPLITS, other=float("-inf"))
        den = tl.load(stat_ptr + slot * 2 + 1, mask=sp < SPLITS, other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # split 0 always holds position 0, so the max is finite
        a = tl.load(part_ptr + slot[:, None] * DP + d[None, :], mask=(sp < SPLITS)[:, None] & (d < D)[None, :],
                    other=0.0)
        o = tl.sum(a * w[:, None], 0) / tl.sum(den * w, 0)
        tl.store(out_ptr + bh * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0) + pdl.wait(PDL)
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
    on = pdl.allowed(h.device)
    _add_rmsnorm_kernel[(rows,)](h, delta if delta is not None else h, weight, out, hidden, eps,
                                 HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(hidden), PDL=on,
                                 launch_pdl=on)
    return out


# Cached positions per program of the decode attention: a cache up to this long is one launch and one program per
# key/value head (at most CHUNK / 64 serial tiles); longer caches are split across programs, then merged.
ATTENTION_CHUNK = 512


def attention_constants(heads: int, kv_heads: int, d: int, t: int, dtype: torch.dtype,
                        chunk: int = ATTENTION_CHUNK) -> tuple[int, int, dict]:
    """The decode attention kernel's launch for a cache of `t` positions: (programs per key/value head, positions
    per program, compile-time constants)."""
    if heads % kv_heads or d % 2:
        raise ValueError(f"{heads} query heads over {kv_heads} key/value heads of size {d}: need a whole number of "
                         "query heads per key/value head and an even head size")
    dp = max(16, triton.next_power_of_2(d))  # tl.dot's smallest dimension
    # Key/value tiles of at most 8 KB: larger ones (with the loop's prefetch) spill registers when compiled for sm_90.
    bn = max(16, min(64, triton.next_power_of_2(chunk), 8192 // (dp * dtype.itemsize)))
    chunk = triton.cdiv(chunk, bn) * bn
    consts = dict(NH=heads, KVH=kv_heads, D=d, DP=dp, GP=max(16, triton.next_power_of_2(heads // kv_heads)), BN=bn,
                  SPLITS=triton.cdiv(t, chunk), PRECISION="ieee" if dtype == torch.float32 else "tf32")
    return consts["SPLITS"], chunk, consts


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, use_triton: bool,
                     chunk: int = ATTENTION_CHUNK, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention from the merged projection ``qkv`` ([B, (heads + 2 kv_heads) * D]) at position
    `pos` ([1], on the device): RoPE on the query and key heads (``cos``/``sin``: [T, D]), the key and value written
    into the caches ([B, kv_heads, T, D]) at `pos`, attention over positions 0..pos. Returns [B, heads * D].
    `mask` ([T], ``arange(T) <= pos``) spares the PyTorch path computing it again in each layer.

    The Triton path is one kernel (two when the cache is longer than `chunk`), where SDPA needs the rotation, the
    cache writes and a mask as launches of their own."""
    b = qkv.shape[0]
    t, d = k_cache.shape[-2:]
    if not use_triton:
        q, k, v = qkv.view(b, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # [1, D]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return x * c + torch.cat((-x2, x1), dim=-1) * s

        k_cache.index_copy_(2, pos, rotate(k).unsqueeze(2))
        v_cache.index_copy_(2, pos, v.unsqueeze(2))
        # The query heads that share a key/value head become that head's queries: plain attention, no GQA.
        if mask is None:
            mask = torch.arange(t, device=pos.device) <= pos
        out = F.scaled_dot_product_attention(rotate(q).reshape(b, kv_heads, heads // kv_heads, d), k_cache, v_cache,
                                             attn_mask=mask.view(1, 1, 1, t))
        return out.reshape(b, heads * d)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.stride(1) == 1):
        raise ValueError("decode_attention needs contiguous caches and qkv rows")
    splits, chunk, consts = attention_constants(heads, kv_heads, d, t, qkv.dtype, chunk)
    on = pdl.allowed(qkv.device)
    dp = consts["DP"]
    out = torch.empty(b, heads * d, dtype=qkv.dtype, device=qkv.device)
    part = stat = out
    if splits > 1:
        part = torch.empty(b * heads * splits, dp, dtype=torch.float32, device=qkv.device)
        stat = torch.empty(b * heads * splits, 2, dtype=torch.float32, device=qkv.device)
    _decode_attention_kernel[(b * kv_heads, splits)](
        qkv, cos, sin, pos, k_cache, v_cache, out, part, stat, qkv.stride(0), t, chunk, d ** -0.5, **consts,
        PDL=on, launch_pdl=on)
    if splits > 1:
        _attention_combine_kernel[(b * heads,)](part, stat, out, D=d, DP=dp, SPLITS=splits,
                                                SP=triton.next_power_of_2(splits), PDL=on, launch_pdl=on)
    return out


def silu_mul(gate_up: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` for ``gate_up = [gate | up]`` ([B, 2 I]) -> [B, I]."""
    rows, two = gate_up.shape
    inter = two // 2
    if not use_triton:
        g, u = gate_up.split(inter, dim=-1)
        return F.silu(g) * u
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    on = pdl.allowed(gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, PDL=on, launch_pdl=on)
    return out
