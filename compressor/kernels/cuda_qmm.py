"""Host side of qmm_mma.cu: the 4-bit dequantize-GEMM on the tensor cores for small batches, in CUDA C++.

Triton does not let a kernel place dequantized weights straight into the tensor cores' operand registers (its
products take operands through its own layouts, here a shared-memory round trip). This kernel does, as Marlin does,
and reads the same packed weights (layout.py) as the Triton kernels: the tuner (triton_qmm.tune) times it next to
them and keeps whichever is faster on the card, after checking its result against the reference.

It is compiled at first use by NVRTC for the device's architecture (about 0.2 s per variant) and needs compute
capability 8.0 or newer (mma.m16n8k16); `applies` says whether a weight and dtype can use it.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from .layout import SUB, KernelWeight
from .pdl import allowed as pdl_allowed, capability, device_index, nvidia

SOURCE = Path(__file__).with_name("qmm_mma.cu")
BLOCK_COLUMNS = 32  # output columns per block


def applies(kw: KernelWeight, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this weight with activations of `dtype` on its device."""
    from . import nvrtc

    dev = kw.qweight.device
    return (kw.bits == 4 and dtype in (torch.float16, torch.bfloat16) and kw.scales.dtype == dtype
            and kw.out_features % 8 == 0 and nvidia(dev) and capability(dev) >= (8, 0)
            and nvrtc.available())


def group_slabs(kw: KernelWeight) -> int:
    """GSLABS of the source: rows per group / 32, 0 for one group over the whole input."""
    return 0 if kw.group_size >= kw.in_features else kw.group_size // SUB


def defines(dtype: torch.dtype, rows_per_block: int, warps: int, gslabs: int, perm: bool, prefetch: bool,
            min_blocks: int = 1, pdl: bool = False, swiglu: bool = False) -> dict:
    """The source's macros for one variant (the kernel is compiled once per distinct set)."""
    return {"BF16": dtype == torch.bfloat16, "MT": rows_per_block // 8, "WARPS": warps, "GSLABS": gslabs,
            "HAS_PERM": perm, "PREFETCH": prefetch, "MINB": min_blocks, "PDL": pdl, "SWIGLU": swiglu}


@lru_cache(maxsize=None)
def _shared_memory(index: int) -> int:
    """The dynamic shared memory a block may have on a device, read once: calls are per launch."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024)) - 64  # the kernel's static `last`


@lru_cache(maxsize=None)
def _kernel(device: int, key: tuple):
    from . import nvrtc

    major, minor = capability(torch.device("cuda", device))
    cubin, _ = nvrtc.compile_cubin(SOURCE.read_text(), "qmm_mma", major * 10 + minor, dict(key))
    with torch.cuda.device(device):
        return nvrtc.Kernel(cubin, "qmm_mma", _shared_memory(device))


def shared_bytes(m: int, tiles_per_split: int, rows_per_block: int, warps: int) -> int:
    """Dynamic shared memory of a launch: the staged activations, or the warps' sums if larger."""
    staged = tiles_per_split * 32 * min(m, rows_per_block) * 16
    return max(staged, warps * 32 * rows_per_block * 4)


def quant_matmul(x2: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, *, split: int, per_split: int,
                 warps: int, rows_per_block: int, prefetch: bool, workspace, min_blocks: int = 1,
                 pdl: bool = False, swiglu: bool = False) -> torch.Tensor:
    """``x2 [m, in] @ dequant(W) (+ bias)``; `split` blocks over the input of `per_split` tiles each (the caller
    clamps them to the shape); `workspace(sums, counters)` gives zeroed float32 sums and int32 counters that the
    kernel leaves zeroed. `pdl`: a programmatic dependent launch (compute capability 9.0+). `swiglu`: x2 is
    [gate | up], [m, 2 in], and the product is ``(silu(gate) * up) @ dequant(W)``."""
    m, n, k = x2.shape[0], kw.out_features, kw.in_features
    if x2.shape[1] != (2 * k if swiglu else k) or x2.stride(1) != 1:
        raise ValueError(f"activations {tuple(x2.shape)} (stride {x2.stride()}): expected "
                         f"[m, {2 * k if swiglu else k}] with contiguous rows")
    dev = x2.device
    if kw.qweight.data_ptr() % 16 or kw.scales.data_ptr() % 8 or kw.zeros.data_ptr() % 8:
        raise ValueError("the kernel reads 16-byte words and 8-byte scale groups: qweight, scales and zeros must be "
                         "aligned to them")
    smem = shared_bytes(m, per_split, rows_per_block, warps)
    if smem > _shared_memory(device_index(dev)):
        raise ValueError(f"{smem} bytes of shared memory: more than the device allows (split the input further)")
    key = tuple(sorted(defines(x2.dtype, rows_per_block, warps, group_slabs(kw), kw.perm is not None,
                               prefetch, min_blocks, pdl, swiglu).items()))
    kernel = _kernel(device_index(dev), key)
    out = torch.empty(m, n, dtype=x2.dtype, device=dev)
    col_blocks, m_blocks = -(-n // BLOCK_COLUMNS), -(-m // rows_per_block)
    ws, count = workspace(m * n, m_blocks * col_blocks) if split > 1 else (out, kw.qweight)
    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)
    xvec = kw.perm is None and k % 8 == 0 and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    perm = kw.perm if kw.perm is not None else kw.qweight  # never read without HAS_PERM
    args = [ptr(x2), ptr(kw.qweight), ptr(kw.scales), ptr(kw.zeros), ptr(perm),
            ptr(bias if bias is not None else kw.scales), ptr(out), ptr(ws), ptr(count)]
    args += [ctypes.c_int(v) for v in (m, n, k, kw.scales.shape[0], per_split, x2.stride(0), out.stride(0),
                                       bias is not None, xvec)]
    if pdl and capability(dev) < (9, 0):
        raise ValueError("programmatic dependent launch needs compute capability 9.0")
    # A PDL variant launched plainly (COMPRESSOR_CUDA_PDL=0 after tuning) is correct: its wait returns at once.
    kernel((col_blocks, split, m_blocks), warps * 32, smem, args, pdl=pdl and pdl_allowed(dev))
    return out
