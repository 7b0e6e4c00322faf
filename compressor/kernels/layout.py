"""The kernels' packing of a QuantizedTensor: what the fused dequantize-GEMM reads on the GPU.

Unlike the GPTQ checkpoint format (consecutive input rows share a word), a word here holds rows that are `SUB` apart:
within a tile of ``SUB * 32/bits`` input rows, packed row ``r`` holds input rows ``r + j * SUB`` at bits
``[j * bits, (j + 1) * bits)``. Unpacking shift ``j`` of a [SUB, N] block of words then gives a [SUB, N] slab of
*consecutive* input rows, so a kernel multiplies it with a contiguous slice of the activations and, with groups a
multiple of SUB, one row of scales: no strided or repeated loads.

Activation order (GPTQ's ``desc_act``) is a permutation of the input rows: rows are stored sorted by group, and the
kernel gathers the activations through ``perm`` instead of permuting the weights at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.tensor import QuantizedTensor

SUB = 32  # input rows per unpacked slab; groups must be a multiple of it (or span the whole input)
KERNEL_BITS = (2, 4, 8)


class UnsupportedLayout(ValueError):
    """The quantized tensor cannot be packed for the fused kernels (the caller falls back to dequantize + matmul)."""


@dataclass
class KernelWeight:
    qweight: torch.Tensor  # int32 [k_padded * bits / 32, out]
    scales: torch.Tensor  # compute dtype [groups, out]
    zeros: torch.Tensor  # compute dtype [groups, out] (integral values)
    perm: torch.Tensor | None  # int32 [in]: packed row i reads activation column perm[i]
    bits: int
    group_size: int  # input rows per group in packed order (>= in_features for a single group)
    in_features: int
    out_features: int

    @property
    def rows_per_tile(self) -> int:
        return SUB * (32 // self.bits)

    def to(self, device: torch.device | str) -> "KernelWeight":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return KernelWeight(move(self.qweight), move(self.scales), move(self.zeros), move(self.perm), self.bits,
                            self.group_size, self.in_features, self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)


def pack_for_kernel(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> KernelWeight:
    """Pack `qt` ([out, in] codes) for the fused kernels; scales and zeros in `dtype` (the activations' dtype)."""
    if qt.bits not in KERNEL_BITS:
        raise UnsupportedLayout(f"{qt.bits}-bit weights: the fused kernels take {KERNEL_BITS} bits")
    out, inp = qt.shape
    codes, perm = qt.codes, None
    groups = qt.scales.shape[1]
    group_size = qt.group_size
    if qt.g_idx is not None and not qt.has_consecutive_groups():
        g = qt.g_idx.long().cpu()
        order = torch.argsort(g, stable=True)
        counts = torch.bincount(g, minlength=groups)
        # Sorted by group, the kernel finds a row's group as row // group_size: every group but the last must be full.
        if bool((counts[:-1] != group_size).any()) or int(counts[-1]) > group_size:
            raise UnsupportedLayout("g_idx groups have unequal sizes; the fused kernels need groups of "
                                    f"{group_size} columns in some order")
        codes = codes[:, order.to(codes.device)]
        perm = order.to(device=codes.device, dtype=torch.int32)
    if groups > 1 and group_size % SUB:
        raise UnsupportedLayout(f"group_size {group_size}: the fused kernels need a multiple of {SUB}")
    if groups == 1:
        group_size = max(group_size, inp)
    per = 32 // qt.bits
    tile = SUB * per
    padded = -(-inp // tile) * tile
    dev = codes.device  # packs where the codes are: on a GPU, a billion weights take a moment
    c = torch.zeros(padded, out, dtype=torch.int64, device=dev)
    c[:inp] = codes.t().to(torch.int64)
    c = c.view(padded // tile, per, SUB, out)  # [tile, j, r, out]: input row = tile*T + j*SUB + r
    words = torch.zeros(padded // tile, SUB, out, dtype=torch.int64, device=dev)
    for j in range(per):
        words |= c[:, j] << (j * qt.bits)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(-1, out)
    return KernelWeight(qweight=words.contiguous(), scales=qt.scales.t().contiguous().to(dev, dtype),
                        zeros=qt.zeros.t().contiguous().to(dev, dtype), perm=perm, bits=qt.bits, group_size=group_size,
                        in_features=inp, out_features=out)


def unpack_codes(kw: KernelWeight) -> torch.Tensor:
    """The uint8 codes [in, out] in packed (group-sorted) row order; the inverse of the packing above."""
    per = 32 // kw.bits
    words = kw.qweight.to(torch.int64).view(-1, SUB, kw.out_features) & 0xFFFFFFFF
    slabs = [(words >> (j * kw.bits)) & ((1 << kw.bits) - 1) for j in range(per)]
    rows = torch.stack(slabs, dim=1).view(-1, kw.out_features)
    return rows[:kw.in_features].to(torch.uint8)
