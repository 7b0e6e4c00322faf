"""The prune stage: remove weights of the chosen linear layers (magnitude, Wanda or SparseGPT), unstructured or N:M.

The layers stay dense nn.Linear modules holding exact zeros: every exporter and runtime reads them as ordinary
weights, and a later quantize stage keeps the zeros zero (see algorithms/gptq.py).
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from torch import nn

from ..algorithms.gptq import factorize
from ..algorithms.sparsegpt import sparsegpt_prune
from ..algorithms.sparsity import magnitude_scores, n_m_mask, outlier_ratio, owl_sparsities, sparsity_of, \
    unstructured_mask, wanda_scores
from ..models import decoder_layers
from ..recipe import PruneConfig
from ..sequential import HessianAccumulator, run_layerwise
from .base import ShapeError, StageContext, StageReport, select_linears

log = logging.getLogger(__name__)


def check_prune_shapes(targets: dict[str, nn.Linear], cfg: PruneConfig, section: str = "prune") -> None:
    """Refuse, before any long work, an N:M pattern that does not divide a layer's inputs."""
    if cfg.n_m is None:
        return
    m = cfg.n_m[1]
    bad = [f"{n} (in_features {mod.in_features})" for n, mod in targets.items() if mod.in_features % m]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ShapeError(f"{section}.pattern {cfg.pattern}: in_features must be a multiple of {m}; not so for "
                         f"{', '.join(bad[:5])}{more} (exclude those layers or choose another M)")


def apply_prune(cfg: PruneConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    targets = select_linears(model, cfg, section="prune")
    check_prune_shapes(targets, cfg)
    report = StageReport("prune", summary={"method": cfg.method, "sparsity": cfg.sparsity, "pattern": cfg.pattern,
                                           "layers": len(targets)})
    if cfg.needs_calibration and ctx.calibration is None:
        raise ValueError(f"prune {cfg.method} ({cfg.allocation}) needs calibration windows")
    block_of = _block_index(model, targets)
    sparsity = {name: cfg.sparsity for name in targets}
    if cfg.allocation == "owl":
        outliers = _OutlierStage(cfg, targets, report, block_of)
        run_layerwise(model, ctx.calibration, outliers, batch_size=ctx.batch_size, device=ctx.device,
                      label="prune owl: outlier ratios", compute_dtype=ctx.compute_dtype,
                      sequential=False)  # nothing changes: one pass suffices
        blocks = sorted(outliers.ratios)
        per_block = dict(zip(blocks, owl_sparsities([outliers.ratios[b] for b in blocks], cfg.sparsity,
                                                    cfg.owl_lambda)))
        sparsity = {name: per_block[block_of[name]] for name in targets}
        report.summary["owl"] = {"outlier_ratio": {b: round(outliers.ratios[b], 5) for b in blocks},
                                 "block_sparsity": {b: round(v, 4) for b, v in per_block.items()}}
    if cfg.method == "magnitude":
        for name, module in targets.items():
            _remove(module, _mask(magnitude_scores(module.weight), cfg, sparsity[name], per_row=False))
            report.layers.append(_row(name, module))
        log.info("prune magnitude: %d layers", len(targets))
    else:
        stage = (_WandaStage if cfg.method == "wanda" else _SparseGPTStage)(cfg, targets, report, sparsity)
        run_layerwise(model, ctx.calibration, stage, batch_size=ctx.batch_size, device=ctx.device,
                      label=f"prune {cfg.method}", sequential=cfg.sequential,
                      checkpoints=ctx.checkpoints(cfg.method, report), compute_dtype=ctx.compute_dtype)
    removed = sum(r["zeros"] for r in report.layers)
    total = sum(r["shape"][0] * r["shape"][1] for r in report.layers)
    report.summary["measured_sparsity"] = round(removed / max(total, 1), 6)
    report.summary["weights_removed"] = removed
    report.seconds = time.perf_counter() - start
    return report


def _mask(scores: torch.Tensor, cfg: PruneConfig, sparsity: float | None, per_row: bool) -> torch.Tensor:
    if cfg.n_m is not None:
        return n_m_mask(scores, *cfg.n_m)
    return unstructured_mask(scores, sparsity, per_row)


def _block_index(model: nn.Module, targets: dict[str, nn.Linear]) -> dict[str, int]:
    prefixes = {id(b): n for n, b in model.named_modules()}
    starts = [(prefixes[id(b)] + ".", i) for i, b in enumerate(decoder_layers(model))]
    return {name: next(i for p, i in starts if name.startswith(p)) for name in targets}


def _remove(module: nn.Linear, mask: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.masked_fill_(mask.to(module.weight.device), 0)


def _row(name: str, module: nn.Linear, **extra) -> dict:
    zeros = int((module.weight == 0).sum())
    return {"name": name, "shape": list(module.weight.shape), "sparsity": round(sparsity_of(module.weight), 6),
            "zeros": zeros, **extra}


class _SquareSum:
    """Σ x_j² over all input rows: the statistic Wanda scores with."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros(features, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sum += x.reshape(-1, x.shape[-1]).float().square().sum(dim=0)

    def all_reduce(self) -> None:
        from ..distributed import all_reduce_sum

        all_reduce_sum(self.sum)


class _PruneStage:
    """A layerwise stage over the chosen linears."""
    keeps_to_its_group = True  # changes only the layers it is given (compressor.sequential may fold)

    def __init__(self, cfg: PruneConfig, targets: dict[str, nn.Linear], report: StageReport,
                 sparsity: dict[str, float | None] | None = None) -> None:
        self.cfg, self.names, self.report = cfg, set(targets), report
        self.sparsity = sparsity or {}

    def wants(self, name: str, module: nn.Module) -> bool:
        return name in self.names


class _WandaStage(_PruneStage):
    def accumulator(self, module: nn.Module) -> _SquareSum:
        return _SquareSum(module.in_features, module.weight.device)

    def process(self, block_index: int, block: nn.Module, group) -> None:
        for name, (module, acc) in group.items():
            _remove(module, _mask(wanda_scores(module.weight, acc.sum), self.cfg, self.sparsity[name], per_row=True))
            self.report.layers.append(_row(name, module))


class _OutlierStage(_WandaStage):
    """Changes nothing: the outlier ratio of each block's Wanda scores on the unpruned model (OWL's statistic)."""

    def __init__(self, cfg: PruneConfig, targets: dict[str, nn.Linear], report: StageReport,
                 block_of: dict[str, int]) -> None:
        super().__init__(cfg, targets, report)
        self.block_of = block_of
        self.left = Counter(block_of.values())  # layers of each block not seen yet
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.ratios: dict[int, float] = {}

    def process(self, block_index: int, block: nn.Module, group) -> None:
        for name, (module, acc) in group.items():
            b = self.block_of[name]
            self.pending.setdefault(b, []).append(wanda_scores(module.weight, acc.sum).cpu())
            self.left[b] -= 1
            if self.left[b] == 0:  # the block's last layer: its ratio over all its layers, then free the scores
                self.ratios[b] = outlier_ratio(self.pending.pop(b), self.cfg.owl_threshold)


class _SparseGPTStage(_PruneStage):
    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator(module.in_features, module.weight.device)

    def process(self, block_index: int, block: nn.Module, group) -> None:
        cfg = self.cfg
        _, acc = next(iter(group.values()))
        factor = factorize(acc.hessian, act_order=False, damp=cfg.damp)  # one input, one Hessian for the group
        for name, (module, _) in group.items():
            res = sparsegpt_prune(module.weight, None, self.sparsity.get(name) or 0.0, cfg.n_m,
                                  block_size=cfg.block_size, factor=factor)
            with torch.no_grad():
                module.weight.copy_(res.weight)
            self.report.layers.append(_row(name, module, loss=round(res.loss, 6), damp=res.damp))
