"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales.

Weights that multiply large activations matter most. Scaling input channel j of the linears that read one tensor by
s_j (and dividing the op that produces the tensor by s_j) leaves the function unchanged, but gives those weights
finer steps on the quantization grid. The scale is searched as ``s = rms(x)^α / mean_w^(1-α)`` over a grid of α,
keeping the one whose quantized weights give the least output error on the calibration inputs.

The output error of a weight error ΔW over inputs X is ``‖ΔW X‖² ∝ tr(ΔW H ΔWᵀ)`` with H the layer-input second
moment (the Hessian GPTQ uses), so the search needs only H, not stored activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # float [out, in] -> dequantized float [out, in]


@dataclass
class ScaleResult:
    scales: torch.Tensor  # [in]: multiply the group's weight columns, divide the producer of their input
    alpha: float | None  # None: no scaling beat the identity
    loss: float  # output error of the quantized group with these scales
    loss_unscaled: float  # the same without scaling (plain round to nearest)


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the squared output error of using `q` for `w`, summed over the calibration tokens (up to the
    constant in H)."""
    d = (w - q).float()
    return float(((d @ hessian) * d).sum())


def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, quantize: Quantizer, grid: int = 20,
                  duo_scaling: bool = True, group_size: int = -1) -> ScaleResult:
    """The scales for linears that read one input (`weights`: their [out, in] matrices; `hessian`: [in, in] second
    moment of that input). `quantize` is the grid the layers will be rounded to."""
    H = hessian.float()
    x_rms = torch.sqrt(torch.diag(H).clamp(min=0) / 2)
    w = torch.cat([m.float() for m in weights])
    if group_size > 0 and w.shape[1] % group_size == 0:  # weight magnitude relative to its group's range
        g = w.abs().view(w.shape[0], -1, group_size)
        w_rel = (g / g.amax(dim=2, keepdim=True).clamp(min=1e-8)).view_as(w)
    else:
        w_rel = w.abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    w_mean = w_rel.mean(dim=0)

    def loss_of(s: torch.Tensor) -> float:
        return sum(output_error(m, quantize(m.float() * s) / s, H) for m in weights)

    ones = torch.ones_like(x_rms)
    best = ScaleResult(ones, None, loss_of(ones), 0.0)
    best.loss_unscaled = best.loss
    for i in range(grid):
        alpha = i / grid
        if duo_scaling:
            s = x_rms.clamp(min=1e-4).pow(alpha) / w_mean.clamp(min=1e-4).pow(1 - alpha)
        else:
            s = x_rms.clamp(min=1e-4).pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        if not torch.isfinite(s).all():
            continue
        loss = loss_of(s)
        if loss < best.loss:
            best = ScaleResult(s, alpha, loss, best.loss_unscaled)
    return best
