"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column like GPTQ quantizes it, spreading each
removed weight onto the columns not yet visited through the inverse Hessian of the layer's inputs.

The mask is chosen adaptively: for unstructured sparsity once per block of columns, from the weights as updated so
far, by the saliency w² / [H⁻¹]_jj²; for N:M patterns every M columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import HessianFactor, factorize, single_thread
from .sparsity import check_n_m


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # pruned and updated, same shape and dtype as the input
    loss: float  # Hessian-weighted squared error, as GPTQ reports it
    damp: float


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor | None, sparsity: float = 0.5,
                    n_m: tuple[int, int] | None = None, damp: float = 0.01, block_size: int = 128,
                    factor: HessianFactor | None = None) -> SparseGPTResult:
    """Prune ``w`` [out, in] to `sparsity` (unstructured) or to the pattern `n_m` = (N, M), given ``hessian``
    [in, in] (mean of 2·x·xᵀ over calibration tokens) or its precomputed ``factor`` (in the original column order)."""
    if factor is None:
        if hessian is None:
            raise ValueError("sparsegpt_prune needs a hessian or its factor")
        factor = factorize(hessian, act_order=False, damp=damp)
    if not torch.equal(factor.perm, torch.arange(w.shape[1], device=factor.perm.device)):
        raise ValueError("SparseGPT visits columns in their own order: factorize without act_order")
    out_f, in_f = w.shape
    if n_m is not None:
        check_n_m(*n_m, in_f)
        if block_size % n_m[1]:
            block_size = n_m[1] * max(1, block_size // n_m[1])
    elif not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    Wt = w.detach().float().t().contiguous()  # a column of W is a contiguous row of Wt
    Wt[factor.dead] = 0
    Hinv = factor.hinv
    losses = torch.zeros(out_f, device=Wt.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        B = Wt[i1:i2].clone()
        Err = torch.zeros_like(B)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        remove = torch.zeros_like(B, dtype=torch.bool)
        if n_m is None:
            saliency = B.square() / diag[:, None].square()
            k = int(saliency.numel() * sparsity)
            if k:
                remove.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
        with single_thread(Wt.device):
            for i in range(i2 - i1):
                if n_m is not None and i % n_m[1] == 0:
                    n, m = n_m
                    saliency = B[i : i + m].square() / diag[i : i + m, None].square()
                    remove[i : i + m].scatter_(0, torch.topk(saliency, n, dim=0, largest=False).indices, True)
                col = B[i]
                diff = torch.where(remove[i], col, torch.zeros_like(col))  # what removing the weights loses
                d = Hinv1[i, i]
                losses += diff.square() / (2 * d * d)
                err = diff / d
                B[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
                B[i] = col - diff
                Err[i] = err
        Wt[i1:i2] = B
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err
    return SparseGPTResult(Wt.t().contiguous().to(w.dtype), float(losses.sum()), factor.damp)
