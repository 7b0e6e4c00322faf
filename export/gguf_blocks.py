"""GGUF's legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) written from integer codes, so that calibrated codes
(GPTQ, AWQ, RTN) reach llama.cpp exactly as they were computed.

Every block covers 32 consecutive weights of one row. Layouts (little endian), value of code ``q``:

    Q4_0  d:f16, qs[16]                d * (q - 8)
    Q4_1  d:f16, m:f16, qs[16]         d * q + m
    Q5_0  d:f16, qh:u32, qs[16]        d * (q - 16)
    Q5_1  d:f16, m:f16, qh:u32, qs[16] d * q + m
    Q8_0  d:f16, qs:i8[32]             d * q

``qs`` holds the low four bits: byte j = q[j] | q[j+16] << 4; bit k of ``qh`` is bit 4 of q[k].
The project's grid is ``scale * (code - zero)`` with a float16 scale, so symmetric codes map onto the ``_0`` types
without any change, and asymmetric ones onto the ``_1`` types with ``m = -scale * zero`` rounded to float16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compressor.quant import grid
from compressor.quant.tensor import QuantizedTensor

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    symmetric: bool  # True: d * (q - offset); False: d * q + m

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)


BLOCK_TYPES = {t.name: t for t in (BlockType("Q4_0", 4, True), BlockType("Q4_1", 4, False),
                                   BlockType("Q5_0", 5, True), BlockType("Q5_1", 5, False),
                                   BlockType("Q8_0", 8, True))}


@dataclass
class Encoded:
    data: np.ndarray  # uint8 [rows, bytes per row]
    refit: bool  # codes were re-derived because the stored scales/offsets differ from the calibrated ones
    max_abs_error: float  # largest |stored - calibrated| weight over the tensor


def mismatch(qt: QuantizedTensor, btype: BlockType) -> str | None:
    """Why `qt` cannot be written as `btype` without re-quantizing, or None when its codes carry over."""
    if qt.bits != btype.bits:
        return f"{qt.bits}-bit codes, {btype.name} holds {btype.bits}-bit ones"
    if qt.group_size != BLOCK:
        return f"groups of {qt.group_size}, {btype.name} blocks are groups of {BLOCK}"
    if not qt.has_consecutive_groups():
        return "groups are not consecutive columns (g_idx)"
    if btype.symmetric and not (qt.symmetric or bool((qt.zeros == btype.offset).all())):
        return f"asymmetric codes, {btype.name} is symmetric (use {btype.name[:2]}_1)"
    if qt.shape[1] % BLOCK:
        return f"{qt.shape[1]} columns are not a multiple of {BLOCK}"
    return None


def encode_codes(qt: QuantizedTensor, btype: BlockType) -> Encoded:
    """Blocks holding the calibrated codes of `qt` (check `mismatch` first)."""
    problem = mismatch(qt, btype)
    if problem:
        raise ValueError(f"cannot write these codes as {btype.name}: {problem}")
    out_f, in_f = qt.shape
    codes = qt.codes.cpu().to(torch.int32).view(out_f, in_f // BLOCK, BLOCK)
    scale = qt.scales.cpu().float()
    zero = qt.zeros.cpu().float()
    calibrated = scale.unsqueeze(-1) * (codes.float() - zero.unsqueeze(-1))
    refit = False
    if btype.symmetric:
        d = scale.half()
        q = codes - btype.offset
        m = None
    else:
        d = scale.half()
        m = (-scale * zero).half()
        q = codes
        if not torch.equal(m.float(), -scale * zero):
            # The offset moved by its float16 rounding: choose the codes nearest to the calibrated weights again
            # (almost always the same codes; the error stays within half a float16 ulp of the offset).
            q = torch.clamp(torch.round((calibrated - m.float().unsqueeze(-1)) / d.float().unsqueeze(-1)),
                            0, (1 << btype.bits) - 1).to(torch.int32)
            refit = True
    stored = _values(d, m, q)
    err = float((stored - calibrated).abs().max()) if calibrated.numel() else 0.0
    return Encoded(_pack(btype, d, m, q), refit, err)


def encode_dense(w: torch.Tensor, btype: BlockType) -> np.ndarray:
    """Round-to-nearest blocks of a dense weight [rows, cols] (cols a multiple of 32), the way llama.cpp's
    reference quantizer does it: the symmetric types map the value of largest magnitude to the lowest code."""
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} columns are not a multiple of {BLOCK}")
    blocks = w.detach().float().cpu().reshape(-1, BLOCK)
    if btype.symmetric:
        if btype.bits == 8:
            amax = blocks.abs().amax(dim=1)
            d = (amax / 127).half()
            inv = torch.where(d.float() == 0, torch.zeros_like(amax), 1 / d.float())
            q = torch.round(blocks * inv.unsqueeze(1)).clamp(-128, 127).to(torch.int32)
            m = None
        else:
            scale, zero = grid.fit(blocks, btype.bits, symmetric=True)
            d = scale.half()
            q = (grid.quantize(blocks, scale.unsqueeze(1), zero.unsqueeze(1), btype.bits) - btype.offset).to(
                torch.int32)
            m = None
    else:
        lo, hi = blocks.min(dim=1).values, blocks.max(dim=1).values
        d = ((hi - lo) / ((1 << btype.bits) - 1)).half()
        m = lo.half()
        inv = torch.where(d.float() == 0, torch.zeros_like(lo), 1 / d.float())
        q = torch.clamp(torch.round((blocks - m.float().unsqueeze(1)) * inv.unsqueeze(1)), 0,
                        (1 << btype.bits) - 1).to(torch.int32)
    shape = (rows, cols // BLOCK)
    return _pack(btype, d.reshape(shape), None if m is None else m.reshape(shape), q.reshape(*shape, BLOCK))


def _values(d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    v = d.float().unsqueeze(-1) * q.float()
    return v if m is None else v + m.float().unsqueeze(-1)


def _pack(btype: BlockType, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor) -> np.ndarray:
    """d, m: [rows, blocks] float16; q: [rows, blocks, 32] int (signed for Q8_0, else unsigned with offset removed
    for the symmetric types and re-added here)."""
    rows, nblocks = d.shape
    parts = [d.numpy().astype("<f2").view(np.uint8).reshape(rows, nblocks, 2)]
    if m is not None:
        parts.append(m.numpy().astype("<f2").view(np.uint8).reshape(rows, nblocks, 2))
    if btype.bits == 8:
        parts.append(q.to(torch.int8).numpy().view(np.uint8))
    else:
        u = (q + (btype.offset if btype.symmetric else 0)).to(torch.int64).numpy()
        if btype.bits == 5:
            high = ((u >> 4) & 1) << np.arange(BLOCK, dtype=np.int64)
            qh = high.sum(axis=-1).astype("<u4")
            parts.append(qh.view(np.uint8).reshape(rows, nblocks, 4))
        low = u & 0xF
        parts.append((low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
