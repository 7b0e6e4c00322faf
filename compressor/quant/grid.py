"""Uniform quantization grids: fit a scale and zero point per group of weights, round to integer codes.

Convention everywhere in the project: ``w ≈ scale * (code - zero)`` with unsigned codes in ``[0, 2**bits - 1]``,
scales representable in float16 (so that every exporter stores exactly what was used) and integer zero points.
Symmetric grids fix ``zero = 2**(bits-1)`` and give the weight of largest magnitude the code 0 (scale carries its
sign), which uses all ``2**bits`` levels the way llama.cpp's Q4_0/Q8_0 blocks do.
"""
from __future__ import annotations

import torch

# Clipping ratios tried by the optional search (1.0 = full range).
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 .. 0.7


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def fit(w: torch.Tensor, bits: int, symmetric: bool, clip_search: bool = False,
        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` ([rows, n] -> [rows], [rows]); float32 scale, float32 integral zero.

    The clipping search minimizes the squared rounding error, weighted per column by `importance` ([n], e.g. the
    mean squared input of each column: then it is the output error) when given."""
    w = w.float()
    if not clip_search:
        return _fit_range(w, bits, symmetric, 1.0)
    best_scale, best_zero = _fit_range(w, bits, symmetric, 1.0)
    best_err = _error(w, best_scale, best_zero, bits, importance)
    for ratio in CLIP_RATIOS[1:]:
        scale, zero = _fit_range(w, bits, symmetric, ratio)
        err = _error(w, scale, zero, bits, importance)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _fit_range(w: torch.Tensor, bits: int, symmetric: bool, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = max_code(bits)
    if symmetric:
        idx = w.abs().argmax(dim=1, keepdim=True)
        extreme = w.gather(1, idx).squeeze(1) * ratio
        half = 1 << (bits - 1)
        scale = _storable(extreme / -half)
        return scale, torch.full_like(scale, float(half))
    lo = (w.min(dim=1).values * ratio).clamp(max=0)
    hi = (w.max(dim=1).values * ratio).clamp(min=0)
    scale = _storable((hi - lo) / maxq)
    # Zero points start at 1: the GPTQ v1 checkpoint format stores zero-1 and cannot hold 0.
    zero = torch.round(-lo / scale).clamp(1, maxq)
    return scale, zero


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """Round to float16, the precision every format stores; an all-zero group gets scale 1, a tiny one the
    smallest float16 instead of 0."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
    tiny = torch.tensor(2.0 ** -24)
    return torch.where(scale == 0, tiny, scale)


def _error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
           importance: torch.Tensor | None = None) -> torch.Tensor:
    q = dequantize(quantize(w, scale.unsqueeze(1), zero.unsqueeze(1), bits), scale.unsqueeze(1), zero.unsqueeze(1))
    err = (q - w).pow(2)
    return (err if importance is None else err * importance.float()[None, :]).sum(dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float tensor of integral values) for ``w`` on the grid; broadcasting shapes."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)
