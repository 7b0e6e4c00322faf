"""Low-bit matmul kernels: fused dequantize-GEMM in Triton for CUDA GPUs, and the same function in plain PyTorch.

`quant_matmul` picks the Triton kernel for CUDA tensors when Triton is installed and the reference otherwise, so
everything imports and runs on a machine without a GPU or without Triton.
"""
from __future__ import annotations

import importlib.util

import torch

from . import reference
from .layout import KernelWeight, UnsupportedLayout, pack_for_kernel

__all__ = ["KernelWeight", "UnsupportedLayout", "pack_for_kernel", "quant_matmul", "triton_available",
           "use_fused_kernels"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from . import triton_qmm

        return triton_qmm.quant_matmul(x, kw, bias)
    return reference.quant_matmul(x, kw, bias)


def use_fused_kernels(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    from .module import use_fused_kernels as swap

    return swap(model, dtype)
