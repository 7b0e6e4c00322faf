"""Quantized weights in onnxruntime's block layouts: `MatMulNBits` (linear layers) and `GatherBlockQuantized`
(embedding tables). Pure tensor layout, no graph: the exporter decides which tensors get which layout.

Both operators store, per output row, blocks of `block_size` consecutive input columns with one scale and one zero
point each: ``w = scale * (code - zero)``, the same formula as `QuantizedTensor`, so calibrated codes map over
exactly. Codes are packed low bits first inside each byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compressor.quant.tensor import QuantizedTensor

CONTAINER_BITS = (2, 4, 8)  # what MatMulNBits and GatherBlockQuantized hold


@dataclass
class BlockWeights:
    """One weight matrix [N, K] in block layout: ``packed`` uint8 [N, blocks, block_size * bits / 8], ``scales``
    [N, blocks], ``zero_points`` packed uint8 [N, ceil(blocks * bits / 8)] or None (the operators' default,
    2**(bits-1), which symmetric grids use)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    n: int
    k: int


def container_bits(code_bits: int) -> int | None:
    """The smallest operator width that holds codes of `code_bits` exactly (3-bit codes fit a 4-bit container)."""
    return next((b for b in CONTAINER_BITS if b >= code_bits), None)


def supported_block(block_size: int) -> bool:
    return block_size >= 16 and block_size & (block_size - 1) == 0


def carries_exactly(qt: QuantizedTensor, bits: int) -> bool:
    """Whether `qt`'s codes go into a `bits`-wide block layout unchanged."""
    return (qt.has_consecutive_groups() and supported_block(qt.group_size) and qt.bits <= bits
            and bits in CONTAINER_BITS)


def block_weights(qt: QuantizedTensor, bits: int, scale_dtype: np.dtype = np.float32) -> BlockWeights:
    """Lay `qt`'s codes out for MatMulNBits / GatherBlockQuantized at width `bits` (>= the codes' own bits).

    A code c of b bits is the same number in a wider container, and so is its zero point, so nothing is re-rounded.
    """
    if not carries_exactly(qt, bits):
        raise ValueError(f"{qt.bits}-bit codes in groups of {qt.group_size} do not fit a {bits}-bit block layout "
                         "(block sizes: powers of two >= 16; widths: 2, 4, 8)")
    n, k = qt.shape
    block = qt.group_size
    blocks = -(-k // block)
    codes = qt.codes.to(torch.uint8)
    zeros = qt.zeros.to(torch.uint8)
    if k % block:  # pad the last block with its zero point so padded columns dequantize to 0
        pad = blocks * block - k
        codes = torch.cat([codes, zeros[:, -1:].expand(n, pad)], dim=1)
    packed = pack_rows(codes.reshape(n * blocks, block), bits).reshape(n, blocks, block * bits // 8)
    default_zero = 1 << (bits - 1)
    zero_points = None if bool((zeros == default_zero).all()) else pack_rows(_pad_to_bytes(zeros, bits), bits)
    return BlockWeights(packed.numpy(), qt.scales.float().numpy().astype(scale_dtype), None if zero_points is None
                        else zero_points.numpy(), bits, block, n, k)


def concat_rows(blocks: list[BlockWeights | None]) -> BlockWeights | None:
    """Matrices of one input stacked along N (one operator call for q/k/v or gate/up), or None where they are not
    all in the same block layout. A matrix on the default zero point gets it written out when another has its own."""
    if any(b is None for b in blocks) or len({(b.bits, b.block_size, b.k) for b in blocks}) != 1:
        return None
    b0 = blocks[0]
    zero_points = None
    if any(b.zero_points is not None for b in blocks):
        default = [pack_rows(_pad_to_bytes(torch.full((b.n, b.packed.shape[1]), 1 << (b.bits - 1),
                                                      dtype=torch.uint8), b.bits), b.bits).numpy() for b in blocks]
        zero_points = np.concatenate([b.zero_points if b.zero_points is not None else d
                                      for b, d in zip(blocks, default)])
    return BlockWeights(np.concatenate([b.packed for b in blocks]), np.concatenate([b.scales for b in blocks]),
                        zero_points, b0.bits, b0.block_size, sum(b.n for b in blocks), b0.k)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, C] codes (< 2**bits, C * bits a multiple of 8) -> uint8 [R, C * bits / 8], low bits first."""
    per = 8 // bits
    r, c = codes.shape
    grouped = codes.to(torch.int32).reshape(r, c // per, per)
    out = torch.zeros(r, c // per, dtype=torch.int32)
    for j in range(per):
        out |= grouped[:, :, j] << (j * bits)
    return out.to(torch.uint8)


def unpack_rows(packed: np.ndarray | torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_rows` on the last dimension, keeping `count` codes."""
    p = torch.as_tensor(np.asarray(packed)).to(torch.int32)
    per = 8 // bits
    parts = [(p >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], -1)[..., :count].to(torch.uint8)


def _pad_to_bytes(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    extra = (-zeros.shape[1]) % per
    if extra:
        zeros = torch.cat([zeros, torch.full((zeros.shape[0], extra), 1 << (bits - 1), dtype=torch.uint8)], dim=1)
    return zeros


def dequantize_block_weights(w: BlockWeights) -> torch.Tensor:
    """The float [N, K] matrix the operators compute with (for checks)."""
    blocks = w.packed.shape[1]
    codes = unpack_rows(w.packed, w.bits, w.block_size).reshape(w.n, blocks, w.block_size).float()
    if w.zero_points is None:
        zeros = torch.full((w.n, blocks), float(1 << (w.bits - 1)))
    else:
        zeros = unpack_rows(w.zero_points, w.bits, blocks).float()
    scales = torch.as_tensor(w.scales).float()
    return ((codes - zeros[:, :, None]) * scales[:, :, None]).reshape(w.n, -1)[:, :w.k]
