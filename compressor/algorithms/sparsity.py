"""Which weights to remove: importance scores (magnitude, Wanda) and the masks that keep the most important ones at a
target sparsity or in an N:M pattern. Masks are boolean [out, in] tensors, True where a weight is removed.

Wanda (Sun et al., 2023) scores a weight by |W_ij| * ||X_j||_2, its magnitude times the norm of the input it
multiplies, and compares weights within each output row; magnitude pruning compares |W| over the whole layer, the
usual baseline.
"""
from __future__ import annotations

import torch


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float()


def wanda_scores(w: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| * ||x_j||: `input_sq_sum` [in] is the sum (or any fixed multiple of it) of each input's squares."""
    return w.detach().abs().float() * input_sq_sum.float().clamp(min=0).sqrt().to(w.device)[None, :]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove the `sparsity` fraction of lowest scores, within each row or over the whole tensor."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * sparsity)
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the `n` lowest scores of every `m` consecutive inputs of each row (2:4 keeps 2 of every 4)."""
    check_n_m(n, m, scores.shape[1])
    out_f, in_f = scores.shape
    blocks = scores.reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(2, torch.topk(blocks, n, dim=2, largest=False).indices, True)
    return mask.reshape(out_f, in_f)


def check_n_m(n: int, m: int, in_features: int | None = None) -> None:
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern removes N of every M weights, 0 < N < M; got {n}:{m}")
    if in_features is not None and in_features % m:
        raise ValueError(f"in_features {in_features} is not a multiple of M={m}")


def sparsity_of(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / max(w.numel(), 1)


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of scores above `threshold` times their mean, over all the given tensors together (OWL's layer
    outlier ratio, computed over a decoder block's linear layers)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Outlier-weighted layerwise sparsity (Yin et al., 2023): blocks with more outliers keep more weights. Densities
    are the outlier ratios mapped linearly onto a range of width 2·lam and centred on 1 - target, so the mean
    sparsity (blocks being the same size) stays the target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    spread = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    density = spread - spread.mean() + (1 - target)
    return [min(max(1 - float(d), 0.0), 0.99) for d in density]
