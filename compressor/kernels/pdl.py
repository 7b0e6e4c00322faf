"""Programmatic dependent launch (compute capability 9.0+): a kernel launched this way is scheduled while the kernel
before it in the stream still runs, and waits for it (``griddepcontrol.wait``) only where it starts to read what that
kernel wrote. At batch 1 a decode step is a chain of short kernels, each bound by its launch and its first loads:
this hides both behind the previous kernel (the matmuls request their first weights before waiting).

The rule every kernel launched this way keeps: before `wait`, it reads only weights and writes nothing, and it lets
the next kernel launch only after its own wait. So its early part overlaps only the kernel right before it, which
never writes weights (they are packed long before their first use), and the parts after the waits stay in stream
order, the split-K workspaces that launches share included. ``COMPRESSOR_CUDA_PDL=0`` turns it off.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, read once per device (launches ask for it)."""
    return _capability(device_index(device))


def nvidia(device: torch.device) -> bool:
    """A CUDA device of NVIDIA's, where kernels may carry PTX (ROCm builds of PyTorch call AMD GPUs "cuda" too)."""
    return device.type == "cuda" and torch.version.hip is None


def allowed(device: torch.device) -> bool:
    """Whether launches on `device` may be programmatic dependent launches."""
    if not nvidia(device) or os.environ.get("COMPRESSOR_CUDA_PDL", "1") == "0":
        return False
    return capability(device) >= (9, 0)


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def wait(PDL: tl.constexpr):
        """With PDL: wait for the previous kernel, let the next one launch, and return an int32 zero the compiler
        cannot see through. Added to the pointers of what the previous kernel wrote, it keeps their loads after the
        wait (an address that depends on it cannot be loaded before it). Without PDL: 0."""
        if PDL:
            zero = tl.inline_asm_elementwise(
                "griddepcontrol.wait;\n\tmov.u32 $0, 0;\n\tgriddepcontrol.launch_dependents;", "=r", [],
                dtype=tl.int32, is_pure=False, pack=1)
        else:
            zero = 0
        return zero
