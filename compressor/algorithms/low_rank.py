"""Low-rank factorization of a linear layer's weight W [out, in] into second [out, r] · first [r, in].

Plain SVD truncates W itself: the best rank-r matrix in the weight's own (Frobenius) norm. Activation-aware SVD
truncates in the norm that matters for the layer's output on calibration inputs X: with H = Xᵀ X = L Lᵀ (Cholesky),
‖(W - W') X‖ = ‖(W - W') L‖, so the SVD of W L truncated to rank r and mapped back by L⁻¹ is the best rank-r weight
for those inputs (the whitening of SVD-LLM). Its discarded squared singular values are exactly the output error it
leaves, which is what rank allocation weighs.

The factors are split with √σ on each side, so neither factor holds all of the scale (which keeps both in a range a
later quantizer handles well).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class Decomposition:
    """The SVD of W (plain) or of W L (activation-aware), kept so that factors of any rank are cheap to take."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, in]; activation-aware: already multiplied by L⁻¹
    whitened: bool

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first [rank, in], second [out, rank])."""
        root = self.s[:rank].sqrt()
        return root[:, None] * self.vh[:rank], self.u[:, :rank] * root

    def tail(self) -> torch.Tensor:
        """tail[r] = the fraction of the energy (Σσ²) a rank-r truncation discards, r = 0..k."""
        energy = self.s.double().square()
        total = float(energy.sum())
        if total == 0:
            return torch.zeros(len(energy) + 1, dtype=torch.float64)
        rest = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        return rest / total


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H plus `damp` times its mean diagonal on the diagonal (a floor for directions the calibration never saw)."""
    h = h.double()
    diag = torch.diagonal(h)
    mean = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    return h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * mean)


def cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor of the damped H, raising the dampening until H is numerically positive definite."""
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(damped(h, damp * 10 ** attempt))
        if int(info) == 0:
            return factor
    raise ValueError("the calibration inputs' second moment is not positive definite even with dampening "
                     f"{damp * 1e5:g}; check the calibration data")


def decompose(w: torch.Tensor, h: torch.Tensor | None = None, damp: float = 0.01) -> Decomposition:
    """Plain SVD of W, or with `h` (Xᵀ X of the layer's inputs) the activation-aware one."""
    w = w.double()
    if h is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Decomposition(u.float(), s.float(), vh.float(), whitened=False)
    lower = cholesky(h.to(w.device), damp)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    # vh L⁻¹ = (L⁻ᵀ vhᵀ)ᵀ: a triangular solve instead of an inverse
    unwhitened = torch.linalg.solve_triangular(lower.t(), vh.t(), upper=True).t()
    return Decomposition(u.float(), s.float(), unwhitened.float(), whitened=True)


def refit_second(w: torch.Tensor, first: torch.Tensor, h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The second factor that, with `first` fixed, reproduces W's outputs best on the inputs behind H:
    argmin_B ‖(W - B A) X‖ = W H Aᵀ (A H Aᵀ)⁻¹."""
    hd = damped(h, damp).to(w.device)
    a = first.double()
    ha = hd @ a.t()
    gram = a @ ha
    gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * 1e-10 * float(
        torch.diagonal(gram).mean().clamp_min(1e-30))
    return torch.linalg.solve(gram, (w.double() @ ha).t()).t().float()


def output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor | None) -> float:
    """Relative error ‖(W - W') X‖² / ‖W X‖² on the inputs behind H (the weights' own norm without H)."""
    d, w = (w - approx).double(), w.double()
    if h is None:
        num, den = float(d.square().sum()), float(w.square().sum())
    else:
        h = h.double().to(w.device)
        num, den = float(((d @ h) * d).sum()), float(((w @ h) * w).sum())
    return num / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------ ranks
def factor_parameters(out_f: int, in_f: int, rank: int) -> int:
    return rank * (out_f + in_f)


def smaller_than_dense(out_f: int, in_f: int, rank: int) -> bool:
    return factor_parameters(out_f, in_f, rank) < out_f * in_f


def rank_for_ratio(out_f: int, in_f: int, ratio: float, alignment: int) -> int | None:
    """The largest multiple of `alignment` whose factors have at most (1 - ratio) of the dense parameters
    (at least `alignment`); None when even that is not smaller than the dense matrix."""
    fits = int((1 - ratio) * out_f * in_f / (out_f + in_f)) // alignment * alignment
    rank = max(alignment, fits)
    return rank if smaller_than_dense(out_f, in_f, rank) and rank <= min(out_f, in_f) else None


def rank_for_energy(tail: torch.Tensor, out_f: int, in_f: int, energy: float, alignment: int) -> int | None:
    """The smallest multiple of `alignment` that keeps at least `energy` of Σσ²; None when that rank is not
    smaller than the dense matrix."""
    k = len(tail) - 1
    for rank in range(alignment, k + 1, alignment):
        if not smaller_than_dense(out_f, in_f, rank):
            return None
        if float(tail[rank]) <= 1 - energy + 1e-12:
            return rank
    return None


@dataclass
class RankOptions:
    """What the allocation knows of one layer."""

    out_f: int
    in_f: int
    tail: torch.Tensor  # predicted relative error at each rank (Decomposition.tail)


def allocate_ranks(layers: dict[str, RankOptions], ratio: float, alignment: int) -> dict[str, int | None]:
    """Ranks (multiples of `alignment`; None = left dense) whose total parameters are at most (1 - ratio) of the
    layers' dense parameters, with the least total predicted error: every layer starts at the smallest rank, then
    the step with the largest error reduction per parameter is taken while the budget allows (the errors are
    convex in the rank, so this greedy choice is optimal up to the last step the budget cannot fit)."""
    dense = sum(o.out_f * o.in_f for o in layers.values())
    budget = (1 - ratio) * dense
    steps: dict[str, list[tuple[int | None, int, float]]] = {}  # name -> [(rank, params, error)] in order
    for name, o in layers.items():
        k = len(o.tail) - 1
        ladder = [(r, factor_parameters(o.out_f, o.in_f, r), float(o.tail[r]))
                  for r in range(alignment, k + 1, alignment) if smaller_than_dense(o.out_f, o.in_f, r)]
        steps[name] = ladder + [(None, o.out_f * o.in_f, 0.0)]
    level = {name: 0 for name in layers}
    used = sum(steps[n][0][1] for n in layers)
    if used > budget:
        raise ValueError(f"ratio {ratio}: even rank {alignment} everywhere keeps {used / dense:.0%} of the "
                         "parameters; lower the ratio or the alignment")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i = level[name]
        if i + 1 < len(steps[name]):
            (_, p0, e0), (_, p1, e1) = steps[name][i], steps[name][i + 1]
            heapq.heappush(heap, (-(e0 - e1) / max(p1 - p0, 1), name))

    for name in layers:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        i = level[name]
        extra = steps[name][i + 1][1] - steps[name][i][1]
        if used + extra > budget:
            continue  # this layer's next step does not fit; others' may
        used += extra
        level[name] = i + 1
        push(name)
    return {name: steps[name][level[name]][0] for name in layers}
