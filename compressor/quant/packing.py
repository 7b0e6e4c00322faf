"""Bit packing of integer codes into int32 words, as the GPTQ checkpoint format stores them.

Every 32 consecutive codes form one little-endian bit stream of ``32 * bits`` bits split into ``bits`` words: code j
occupies stream bits [j*bits, (j+1)*bits). For 2, 4 and 8 bits no code crosses a word boundary and this is the plain
"``32 / bits`` codes per word, lowest first" layout; for 3 bits it is the layout GPTQ kernels expect
(10⅔ codes per word).
"""
from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `codes` (< 2**bits) along `dim` (length a multiple of 32/gcd) into int32 words."""
    codes = codes.movedim(dim, 0).to(torch.int64)
    n = codes.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    per = 32 // _gcd(32, bits)  # codes per repeating unit of whole words
    words_per = per * bits // 32
    c = codes.reshape(n // per, per, *codes.shape[1:])
    out = torch.zeros(n // per, words_per, *codes.shape[1:], dtype=torch.int64)
    for j in range(per):
        bit = j * bits
        w, shift = divmod(bit, 32)
        out[:, w] |= (c[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code's high bits spill into the next word
            out[:, w + 1] |= c[:, j] >> (32 - shift)
    out = out.reshape(n * bits // 32, *codes.shape[1:])
    return _to_int32(out).movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: `count` codes (uint8) along `dim`."""
    words = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    per = 32 // _gcd(32, bits)
    words_per = per * bits // 32
    w = words.reshape(-1, words_per, *words.shape[1:])
    mask = (1 << bits) - 1
    out = torch.zeros(w.shape[0], per, *words.shape[1:], dtype=torch.int64)
    for j in range(per):
        bit = j * bits
        i, shift = divmod(bit, 32)
        val = w[:, i] >> shift
        if shift + bits > 32:
            val = val | (w[:, i + 1] << (32 - shift))
        out[:, j] = val & mask
    out = out.reshape(-1, *words.shape[1:])[:count]
    return out.to(torch.uint8).movedim(0, dim).contiguous()


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def byte_pack_width(bits: int) -> int:
    """Bits a code takes inside a byte in `pack_bytes`: the smallest of 1, 2, 4 and 8 that holds `bits`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits do not fit a byte")
    return next(w for w in (1, 2, 4, 8) if w >= bits)


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `codes` (uint8, < 2**bits) along the last dimension, 8 // byte_pack_width(bits) per byte, the
    first in the lowest bits; the last byte is padded with zero codes. The in-memory form of a QuantLinear's codes
    (half the bytes at 3 and 4 bits), not a file format."""
    width = byte_pack_width(bits)
    if width == 8:
        return codes.to(torch.uint8)
    per = 8 // width
    n = codes.shape[-1]
    pad = -n % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (j * width)
    return out


def unpack_bytes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bytes`: the first `count` codes (uint8) along the last dimension."""
    width = byte_pack_width(bits)
    if width == 8:
        return packed
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].contiguous()
