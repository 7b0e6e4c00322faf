"""How much a change of one linear layer's weight costs the model's output, to second order.

For a layer y = W x inside the model, the KL divergence between the model's next-token distribution before and after
W changes by dW is, to second order, 1/2 E[dy^T F dy] with F the Fisher information of the output distribution with
respect to y. Keeping F's diagonal (G, the mean squared gradient of y under labels sampled from the model) and taking
the layer's input independent of its output gradient (as K-FAC does) gives

    predicted KL per token = 1/2 * sum_o G[o] * (dW H dW^T)[o, o],   H = E[x x^T]

so the cost of quantizing a layer at a candidate width is one matrix product with statistics gathered once.
"""
from __future__ import annotations

import torch


def predicted_kl(dw: torch.Tensor, hessian: torch.Tensor, out_fisher: torch.Tensor) -> float:
    """1/2 sum_o G[o] (dW H dW^T)[o, o] for dW [out, in], H [in, in] and G [out]."""
    dw = dw.double()
    per_row = ((dw @ hessian.double()) * dw).sum(1)
    return 0.5 * float((out_fisher.double() * per_row).sum())
