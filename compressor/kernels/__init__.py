"""Low-bit matmul kernels: fused dequantize-GEMM in Triton for CUDA GPUs, and the same function in plain PyTorch.

`quant_matmul` picks the Triton kernel for CUDA tensors when Triton is installed and the reference otherwise, so
everything imports and runs on a machine without a GPU or without Triton.
"""
from __future__ import annotations

import importlib.util

import torch

from . import reference
from .layout import KernelWeight, UnsupportedLayout, pack_for_kernel

__all__ = ["KernelWeight", "UnsupportedLayout", "pack_for_kernel", "quant_matmul", "swiglu_matmul",
           "triton_available", "use_fused_kernels"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from . import triton_qmm

        return triton_qmm.quant_matmul(x, kw, bias)
    return reference.quant_matmul(x, kw, bias)


def swiglu_matmul(gate_up: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
                  use_triton: bool = True) -> torch.Tensor:
    """``(silu(gate) * up) @ dequant(W) (+ bias)`` for ``gate_up = [gate | up]`` ([..., 2 in]): a down projection
    after its SwiGLU. One launch where the tuner chose the GEMV or the CUDA C++ kernel for this shape (they compute
    the SwiGLU as they load the activations); otherwise the SwiGLU kernel (`use_triton`) or PyTorch, then
    `quant_matmul`."""
    from .fused_ops import silu_mul

    if gate_up.is_cuda and gate_up.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from . import triton_qmm

        cfg = triton_qmm.tuned_config(gate_up.numel() // gate_up.shape[-1], kw, gate_up.dtype)
        if triton_qmm.takes_swiglu(cfg):  # the tuner keeps only configurations that ran on this weight and device
            return triton_qmm.quant_matmul(gate_up, kw, bias, config=cfg, swiglu=True)
    a = silu_mul(gate_up.reshape(-1, gate_up.shape[-1]), use_triton and triton_available())
    return quant_matmul(a.view(*gate_up.shape[:-1], -1), kw, bias)


def use_fused_kernels(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    from .module import use_fused_kernels as swap

    return swap(model, dtype)
