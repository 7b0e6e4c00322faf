"""QuantLinear's GPU twin: a linear layer that keeps only the kernels' packed weight and runs the fused kernel."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.tensor import QuantLinear
from . import quant_matmul, swiglu_matmul
from .layout import KernelWeight, UnsupportedLayout, pack_for_kernel


class FusedQuantLinear(nn.Module):
    def __init__(self, kw: KernelWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = kw.in_features, kw.out_features
        self.bits, self.group_size = kw.bits, kw.group_size
        self.register_buffer("qweight", kw.qweight)
        self.register_buffer("scales", kw.scales)
        self.register_buffer("zeros", kw.zeros)
        self.register_buffer("perm", kw.perm)
        self.register_buffer("bias", None if bias is None else bias.detach().to(kw.scales.dtype))

    @classmethod
    def from_quant_linear(cls, m: QuantLinear, dtype: torch.dtype = torch.float16) -> "FusedQuantLinear":
        kw = pack_for_kernel(m.qweight, dtype).to(m.codes.device)
        return cls(kw, m.bias)

    def kernel_weight(self) -> KernelWeight:
        return KernelWeight(self.qweight, self.scales, self.zeros, self.perm, self.bits, self.group_size,
                            self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.kernel_weight(), self.bias)

    def forward_swiglu(self, gate_up: torch.Tensor, use_triton: bool = True) -> torch.Tensor:
        """This layer applied to silu(gate) * up of ``gate_up = [gate | up]`` (a down projection)."""
        return swiglu_matmul(gate_up, self.kernel_weight(), self.bias, use_triton)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")


def use_fused_kernels(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Swap every QuantLinear of `model` for a FusedQuantLinear; returns {layer: why} for those left as they were."""
    kept: dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        try:
            fused = FusedQuantLinear.from_quant_linear(m, dtype)
        except UnsupportedLayout as e:
            kept[name] = str(e)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fused)
    return kept
