"""The fused kernels' function in plain PyTorch: the CPU path and the ground truth of the kernel tests."""
from __future__ import annotations

import torch

from .layout import KernelWeight, unpack_codes


def dequantize(kw: KernelWeight) -> torch.Tensor:
    """The weight [in, out] in the scales' dtype, rows in the original input order."""
    codes = unpack_codes(kw).to(kw.qweight.device)
    group = torch.arange(kw.in_features, device=codes.device) // kw.group_size
    w = (codes.to(kw.scales.dtype) - kw.zeros[group]) * kw.scales[group]
    if kw.perm is None:
        return w
    out = torch.empty_like(w)
    out[kw.perm.long()] = w
    return out


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W [in, out] (+ bias)``, dequantizing in x's dtype as the kernels do."""
    w = dequantize(kw).to(x.dtype)
    y = x @ w
    return y if bias is None else y + bias.to(x.dtype)
