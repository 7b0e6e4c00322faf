"""Structured pruning math: which input channels of a projection matter least, and the least-squares update that lets
the remaining channels reproduce the projection's output (the structured form of the OBS / SparseGPT update).

A projection y = W x loses input channel j's contribution W[:, j] x_j. With H = E[x xᵀ] (any positive multiple), the
output energy of channel j alone is ‖W[:, j]‖² H_jj; after removing a set of channels, the weights on the kept set K
that best reproduce y on the calibration inputs are W H[:, K] H[K, K]⁻¹.
"""
from __future__ import annotations

import torch


def channel_energy(w: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖² · E[x_j²] for each input channel j of `w` [out, in]; `input_sq` [in] is E[x²] or a multiple."""
    return w.detach().float().square().sum(dim=0) * input_sq.float().to(w.device)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (the order the layers keep)."""
    return torch.sort(torch.topk(scores, keep).indices).values


def aligned_keep(total: int, fraction: float, alignment: int) -> int:
    """How many of `total` channels to keep when removing about `fraction` of them, rounded to a multiple of
    `alignment` (and never all, never none)."""
    keep = round(total * (1 - fraction) / alignment) * alignment
    return max(alignment, min(keep, total - alignment))


def reconstruct(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Weights [out, len(keep)] on the kept input channels that best reproduce w's outputs: W H[:, K] H[K, K]⁻¹,
    with H[K, K] dampened by `damp` times its mean diagonal."""
    H = hessian.float()
    Hkk = H[keep][:, keep]
    Hkk = Hkk + damp * torch.diag(Hkk).mean() * torch.eye(len(keep), device=H.device)
    rhs = w.float() @ H[:, keep]  # [out, K]
    return torch.linalg.solve(Hkk, rhs.T).T.to(w.dtype)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_in, x_out) per token (ShortGPT's block influence): how much a block changes the residual stream."""
    return 1 - torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
