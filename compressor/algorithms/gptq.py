"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..quant import grid
from ..quant.tensor import QuantizedTensor

log = logging.getLogger(__name__)

MAX_DAMP = 1.0  # retries multiply the dampening by 10 up to this fraction of the mean diagonal


@dataclass
class GPTQResult:
    qweight: QuantizedTensor
    row_loss: torch.Tensor  # per output row: the Hessian-weighted squared error GPTQ minimizes
    damp: float  # dampening that made the Hessian positive definite

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


@dataclass
class HessianFactor:
    """What GPTQ needs from a Hessian, computed once for all layers that read the same input."""

    hinv: torch.Tensor  # upper Cholesky factor of the dampened inverse Hessian, in processing order
    perm: torch.Tensor  # processing order of the columns
    dead: torch.Tensor  # inputs that were always zero
    damp: float


def factorize(hessian: torch.Tensor, act_order: bool = False, damp: float = 0.01) -> HessianFactor:
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    hinv, used = _inverse_cholesky(H[perm][:, perm], damp)
    return HessianFactor(hinv, perm, dead, used)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int, symmetric: bool,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  clip_search: bool = False, factor: HessianFactor | None = None) -> GPTQResult:
    """Quantize ``w`` [out, in] given ``hessian`` [in, in] (mean of 2·x·xᵀ over calibration tokens), or its
    precomputed ``factor``.

    With ``act_order`` columns are processed by decreasing Hessian diagonal, while groups stay consecutive in the
    original column order and their grids are fitted before any update ("static groups"): the result needs no
    column permutation to store or run. Without it, each group's grid is fitted when the first column of the group is
    reached, on the weights as updated so far.

    Weights that are exactly zero (pruned) get the code of zero and stay zero; their neighbours absorb the error.
    """
    if factor is None:
        if hessian is None:
            raise ValueError("gptq_quantize needs a hessian or its factor")
        factor = factorize(hessian, act_order, damp)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)
    W = w.detach().float().clone()
    W[:, factor.dead] = 0
    dev = W.device
    scales = torch.zeros(out_f, n_groups, device=dev)
    zeros = torch.zeros(out_f, n_groups, device=dev)
    fitted = [False] * n_groups
    perm = factor.perm
    if not torch.equal(perm, torch.arange(in_f, device=perm.device)):
        # Static groups: every grid is fitted on the original weights before columns are visited out of order.
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid.fit(W[:, g * gs : (g + 1) * gs], bits, symmetric, clip_search)
        fitted = [True] * n_groups
    zero = w == 0
    pruned = zero[:, perm].t().contiguous() if bool(zero.any()) else None
    W = W[:, perm]
    group_of = (perm // gs).tolist()  # group of each processed column
    Hinv = factor.hinv

    # Work on Wᵀ so that a column of W is a contiguous row; the per-column updates are tiny, and on a CPU they run
    # far faster on one thread than on several (thread wake-ups dominate), so only the block GEMMs use all threads.
    Wt = W.t().contiguous()
    codes = torch.zeros(in_f, out_f, device=dev)
    losses = torch.zeros(out_f, device=dev)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        B = Wt[i1:i2].clone()
        Err = torch.zeros_like(B)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with single_thread(dev):
            for i in range(i2 - i1):
                col = i1 + i
                g = group_of[col]
                if not fitted[g]:
                    # Consecutive groups (no act_order): fit on the group's current, error-updated columns.
                    width = min(gs, in_f - col)
                    current = torch.cat([B[i:], Wt[i2:]])[:width]
                    s_, z_ = grid.fit(current.t(), bits, symmetric, clip_search)
                    scales[:, g], zeros[:, g] = s_, z_
                    fitted[g] = True
                w = B[i]
                s, z = scales[:, g], zeros[:, g]
                q = grid.quantize(w, s, z, bits)
                if pruned is not None:
                    q = torch.where(pruned[col], z, q)
                diff = w - grid.dequantize(q, s, z)
                codes[col] = q
                d = Hinv1[i, i]
                losses += diff.square() / (2 * d * d)
                err = diff / d
                B[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
                Err[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err

    codes = codes.t()
    inv = torch.argsort(perm)
    qt = QuantizedTensor(codes[:, inv].to(torch.uint8), scales.half(), zeros.to(torch.uint8), bits, gs, symmetric)
    return GPTQResult(qt, losses, factor.damp)


@contextmanager
def single_thread(device: torch.device):
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after dampening; retries with 10x the dampening when H is not positive
    definite (too few calibration tokens, dead inputs)."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for attempt in range(64):
        if attempt:
            d = min(d * 10, MAX_DAMP)
        L, info = torch.linalg.cholesky_ex(H + (d * mean_diag) * eye)
        if info == 0:
            # H⁻¹ = L⁻ᵀL⁻¹ through a triangular solve: torch.cholesky_inverse is many times slower on CPU.
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            U, info = torch.linalg.cholesky_ex(Linv.T @ Linv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("Hessian not positive definite; dampening raised to %.3g", d)
                return U, d
        if d >= MAX_DAMP:
            break
    raise ValueError(f"Hessian is not positive definite even with dampening {d:.3g}; calibrate on more or more "
                     "varied text")
