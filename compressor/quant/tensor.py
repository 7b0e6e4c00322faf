"""The one in-memory representation of a quantized weight matrix, read by every exporter and runtime."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import grid
from .packing import pack_bytes, unpack_bytes


@dataclass
class QuantizedTensor:
    """A [out, in] weight as integer codes with per-group scales and zero points along the input dimension.

    ``w[o, i] = scales[o, g] * (codes[o, i] - zeros[o, g])`` with ``g = g_idx[i]``. Without ``g_idx`` the groups are
    consecutive: ``g = i // group_size`` (a last, shorter group when ``group_size`` does not divide ``in``).
    """

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [out, groups]
    zeros: torch.Tensor  # uint8 [out, groups]
    bits: int
    group_size: int  # columns per group; in_features for per-channel
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 [in]; only for checkpoints whose groups are not consecutive

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        groups = self.scales.shape[1]
        if self.scales.shape != (out, groups) or self.zeros.shape != (out, groups):
            raise ValueError(f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match "
                             f"codes {tuple(self.codes.shape)}")
        if self.g_idx is None and groups != -(-inp // self.group_size):
            raise ValueError(f"{groups} groups do not fit {inp} columns in groups of {self.group_size}")
        if self.g_idx is not None and self.g_idx.shape != (inp,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({inp},)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    def has_consecutive_groups(self) -> bool:
        if self.g_idx is None:
            return True
        return bool(torch.equal(self.g_idx.long(), torch.arange(self.codes.shape[1]) // self.group_size))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype == torch.bfloat16:  # rounded once: in bfloat16 the float16 scales would be rounded before the product
            return self.dequantize(torch.float32).to(dtype)
        g = self.group_index()
        scales = self.scales.to(dtype)
        zeros = self.zeros.to(dtype)
        if self.g_idx is None and self.codes.shape[1] % self.group_size == 0:
            out, inp = self.codes.shape
            codes = self.codes.to(dtype).view(out, -1, self.group_size)
            return ((codes - zeros.unsqueeze(2)) * scales.unsqueeze(2)).view(out, inp)
        return (self.codes.to(dtype) - zeros[:, g]) * scales[:, g]

    def rows(self, rows: slice) -> "QuantizedTensor":
        """The output rows `rows` (e.g. one layer of a stacked q/k/v weight), in tensors of their own."""
        return QuantizedTensor(self.codes[rows].clone(), self.scales[rows].clone(), self.zeros[rows].clone(),
                               self.bits, self.group_size, self.symmetric, self.g_idx)

    def nbytes_packed(self) -> int:
        """Bytes of codes at `bits` each plus fp16 scales and zero points at `bits` each (storage, not memory)."""
        out, inp = self.codes.shape
        groups = self.scales.shape[1]
        return (out * inp * self.bits + 7) // 8 + groups * out * 2 + (groups * out * self.bits + 7) // 8


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool = False, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Round to nearest on per-group grids fitted to ``w`` ([out, in]); `importance` ([in]) weighs the clipping
    search's error per input column."""
    out, inp = w.shape
    gs = inp if group_size == -1 else group_size
    w = w.float()
    codes = torch.empty(out, inp, dtype=torch.uint8)
    groups = -(-inp // gs)
    scales = torch.empty(out, groups)
    zeros = torch.empty(out, groups)
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, inp))
        scale, zero = grid.fit(w[:, cols], bits, symmetric, clip_search,
                               None if importance is None else importance[cols])
        codes[:, cols] = grid.quantize(w[:, cols], scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedTensor(codes, scales.half(), zeros.to(torch.uint8), bits, gs, symmetric)


class QuantLinear(nn.Module):
    """A linear layer whose weight is a QuantizedTensor; the reference (dequantize, then matmul) forward.

    The buffer `codes` holds the codes packed `pack_bytes`-wise (two per byte at 3 and 4 bits): a model quantized
    layer by layer keeps every finished layer's codes until the export (SmolLM2 at 4 bits: 53 MB instead of 106, of
    a ~1.3 GB peak). `qweight` unpacks them (cheaper than the dequantization that follows)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.symmetric = qweight.symmetric
        self.register_buffer("codes", pack_bytes(qweight.codes, qweight.bits))
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.register_buffer("g_idx", qweight.g_idx)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def qweight(self) -> QuantizedTensor:
        return QuantizedTensor(unpack_bytes(self.codes, self.bits, self.in_features), self.scales, self.zeros,
                               self.bits, self.group_size, self.symmetric, self.g_idx)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, for code that reads `.weight` (e.g. tied heads, dtype probes)."""
        return self.qweight.dequantize(self.scales.dtype if self.scales.is_cuda else torch.float32)

    def materialize(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep the dequantized weight (exactly what forward would compute) for fast inference where no low-bit
        kernel exists; memory becomes that of a dense layer plus the codes."""
        self.register_buffer("dense", self.qweight.dequantize(dtype), persistent=False)

    def dematerialize(self) -> None:
        """Drop the weight `materialize` kept: forward dequantizes on each call again."""
        self._buffers.pop("dense", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = getattr(self, "dense", None)
        w = dense.to(x.dtype) if dense is not None else self.qweight.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
