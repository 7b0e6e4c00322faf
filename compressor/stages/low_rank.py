"""The low_rank stage: replace the chosen linear layers by LowRankLinear factor pairs (compressor/low_rank.py).

Ranks come from one of: a parameter ratio per layer (uniform, or per layer kind), a share of each layer's energy, a
fixed rank, or a model-wide parameter budget split by predicted error (sensitivity). Activation-aware truncation and
the second-factor refit read each layer's input statistics from the layer-by-layer runner; the sensitivity
allocation first measures every layer's spectrum on the unchanged model (one extra statistics pass). A layer whose
factors would not be smaller than its matrix stays dense and is reported so.
"""
from __future__ import annotations

import logging
import re
import time

import torch
from torch import nn

from ..algorithms.low_rank import Decomposition, RankOptions, allocate_ranks, decompose, factor_parameters, \
    output_error, rank_for_energy, rank_for_ratio, refit_second, smaller_than_dense
from ..low_rank import LowRankLinear
from ..recipe import LowRankConfig
from ..sequential import HessianAccumulator, run_layerwise
from .base import ShapeError, StageContext, StageReport, select_linears, set_submodule

log = logging.getLogger(__name__)


def low_rank_targets(model: nn.Module, cfg: LowRankConfig, section: str = "low_rank") -> dict[str, nn.Linear]:
    """The linear layers the stage factorizes (with a per-kind ratio, those matching one of its patterns)."""
    targets = select_linears(model, cfg, section=section)
    if isinstance(cfg.ratio, dict):
        targets = {n: m for n, m in targets.items() if _kind_ratio(cfg.ratio, n) is not None}
        if not targets:
            raise ShapeError(f"{section}.ratio: no selected linear layer matches any of {list(cfg.ratio)}")
    if cfg.rank is not None:
        too_big = [f"{n} ({m.out_features}x{m.in_features})" for n, m in targets.items()
                   if cfg.rank > min(m.out_features, m.in_features)]
        if len(too_big) == len(targets):
            raise ShapeError(f"{section}.rank {cfg.rank} exceeds the smaller dimension of every chosen layer, e.g. "
                             f"{too_big[0]}; no layer would be factorized")
    return targets


def check_low_rank(targets: dict[str, nn.Linear], cfg: LowRankConfig, section: str = "low_rank") -> None:
    """Refuse, before any calibration, a choice under which no layer would be factorized or a budget that even the
    smallest ranks exceed."""
    planned = planned_ranks(targets, cfg)
    if planned is not None and not any(planned.values()):
        what = f"rank {cfg.rank}" if cfg.rank is not None else f"ratio {cfg.ratio} (alignment {cfg.alignment})"
        raise ShapeError(f"{section}: with {what} no chosen layer's factors would be smaller than its matrix, so "
                         "nothing would be factorized; remove more parameters or lower the alignment")
    if cfg.allocation == "sensitivity":
        dense = sum(m.out_features * m.in_features for m in targets.values())
        least = sum(min(factor_parameters(m.out_features, m.in_features, cfg.alignment),
                        m.out_features * m.in_features) for m in targets.values())
        if least > (1 - cfg.ratio) * dense:
            raise ShapeError(f"{section}.ratio {cfg.ratio}: even rank {cfg.alignment} in every layer keeps "
                             f"{least / dense:.0%} of the parameters; lower the ratio or the alignment")


def planned_ranks(targets: dict[str, nn.Linear], cfg: LowRankConfig) -> dict[str, int | None] | None:
    """The ranks that follow from the shapes alone (ratio with uniform allocation, or a fixed rank); None where
    they depend on the data (energy, sensitivity)."""
    if cfg.rank is not None:
        return {n: cfg.rank if cfg.rank <= min(m.out_features, m.in_features)
                and smaller_than_dense(m.out_features, m.in_features, cfg.rank) else None
                for n, m in targets.items()}
    if cfg.ratio is not None and cfg.allocation == "uniform":
        return {n: rank_for_ratio(m.out_features, m.in_features, _ratio_of(cfg, n), cfg.alignment)
                for n, m in targets.items()}
    return None


def apply_low_rank(cfg: LowRankConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    targets = low_rank_targets(model, cfg)
    check_low_rank(targets, cfg)
    report = StageReport("low_rank", summary={"method": cfg.method, "ratio": cfg.ratio, "energy": cfg.energy,
                                              "rank": cfg.rank, "allocation": cfg.allocation, "update": cfg.update,
                                              "layers": len(targets)})
    if cfg.needs_calibration and ctx.calibration is None:
        raise ValueError(f"low_rank {cfg.method}{' with update' if cfg.update else ''} needs calibration windows")
    ranks = planned_ranks(targets, cfg)
    if ranks is None and cfg.allocation == "sensitivity":
        options = _spectra(model, targets, cfg, ctx)
        ranks = allocate_ranks(options, cfg.ratio, cfg.alignment)
    factorizer = _Factorizer(model, cfg, targets, ranks, report)
    if cfg.needs_calibration:
        run_layerwise(model, ctx.calibration, factorizer, batch_size=ctx.batch_size, device=ctx.device,
                      label=f"low_rank {cfg.method}", sequential=cfg.sequential, compute_dtype=ctx.compute_dtype)
    else:
        for i, (name, module) in enumerate(targets.items()):
            factorizer.factorize(name, module, None)
            if (i + 1) % 50 == 0 or i + 1 == len(targets):
                log.info("low_rank svd: %d/%d layers", i + 1, len(targets))
    dense = sum(r["dense_parameters"] for r in report.layers)
    kept = sum(r["parameters"] for r in report.layers)
    left = [r["name"] for r in report.layers if r["rank"] is None]
    report.summary.update({
        "factorized": len(report.layers) - len(left), "left_dense": left,
        "parameters_before": dense, "parameters_after": kept,
        "parameters_removed_ratio": round(1 - kept / dense, 6) if dense else 0.0,
        "mean_predicted_error": round(sum(r["predicted_error"] for r in report.layers) / max(len(report.layers), 1),
                                      6)})
    if left:
        log.info("low_rank: %d layer(s) left dense (factors would not be smaller): %s", len(left),
                 ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
    report.seconds = time.perf_counter() - start
    return report


def _kind_ratio(ratios: dict[str, float], name: str) -> float | None:
    return next((r for pattern, r in ratios.items() if re.search(pattern, name)), None)


def _ratio_of(cfg: LowRankConfig, name: str) -> float:
    return _kind_ratio(cfg.ratio, name) if isinstance(cfg.ratio, dict) else cfg.ratio


class _Factorizer:
    """Factorizes each target layer when the runner (or the data-free loop) reaches it."""
    keeps_to_its_group = True  # changes only the layers it is given (compressor.sequential may fold)

    def __init__(self, model: nn.Module, cfg: LowRankConfig, targets: dict[str, nn.Linear],
                 ranks: dict[str, int | None] | None, report: StageReport) -> None:
        self.model, self.cfg, self.names, self.ranks, self.report = model, cfg, set(targets), ranks, report

    def wants(self, name: str, module: nn.Module) -> bool:
        return name in self.names

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator(module.in_features, module.weight.device)

    def process(self, block_index: int, block: nn.Module, group) -> None:
        _, acc = next(iter(group.values()))
        h = acc.hessian  # one input, one statistic for the group
        for name, (module, _) in group.items():
            self.factorize(name, module, h)

    def factorize(self, name: str, module: nn.Linear, h: torch.Tensor | None) -> None:
        cfg = self.cfg
        w = module.weight.detach().float()
        out_f, in_f = w.shape
        dec = decompose(w, h if cfg.method == "activation_aware" else None, cfg.damp)
        rank = self._rank(name, dec, out_f, in_f)
        row = {"name": name, "shape": [out_f, in_f], "rank": rank, "dense_parameters": out_f * in_f}
        if rank is None:
            self.report.layers.append({**row, "parameters": out_f * in_f, "predicted_error": 0.0})
            return
        first, second = dec.factors(rank)
        if cfg.update:
            second = refit_second(w, first, h, cfg.damp)
        approx = second @ first
        error = output_error(w, approx, h)
        bias = module.bias.detach() if module.bias is not None else None
        layer = LowRankLinear.from_factors(first.to(module.weight.dtype), second.to(module.weight.dtype), bias)
        set_submodule(self.model, name, layer)
        self.report.layers.append({**row, "parameters": factor_parameters(out_f, in_f, rank),
                                   "predicted_error": round(float(dec.tail()[rank]), 6),
                                   "output_error" if h is not None else "weight_error": round(error, 6)})

    def _rank(self, name: str, dec: Decomposition, out_f: int, in_f: int) -> int | None:
        if self.ranks is not None:
            return self.ranks[name]
        return rank_for_energy(dec.tail(), out_f, in_f, self.cfg.energy, self.cfg.alignment)


class _SpectrumStage(_Factorizer):
    """Changes nothing: every target layer's predicted error at each rank, on the unchanged model."""

    def __init__(self, model: nn.Module, cfg: LowRankConfig, targets: dict[str, nn.Linear]) -> None:
        super().__init__(model, cfg, targets, None, StageReport("low_rank"))
        self.options: dict[str, RankOptions] = {}

    def process(self, block_index: int, block: nn.Module, group) -> None:
        _, acc = next(iter(group.values()))
        h = acc.hessian if self.cfg.method == "activation_aware" else None
        for name, (module, _) in group.items():
            dec = decompose(module.weight.detach().float(), h, self.cfg.damp)
            self.options[name] = RankOptions(module.out_features, module.in_features, dec.tail())


def _spectra(model: nn.Module, targets: dict[str, nn.Linear], cfg: LowRankConfig, ctx: StageContext
             ) -> dict[str, RankOptions]:
    if cfg.method == "svd":
        return {n: RankOptions(m.out_features, m.in_features, decompose(m.weight.detach().float()).tail())
                for n, m in targets.items()}
    stage = _SpectrumStage(model, cfg, targets)
    run_layerwise(model, ctx.calibration, stage, batch_size=ctx.batch_size, device=ctx.device,
                  label="low_rank: spectra for the allocation", sequential=False, compute_dtype=ctx.compute_dtype)
    return stage.options
