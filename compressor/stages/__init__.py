"""Compression stages: plain configs (compressor.recipe) applied to a model in recipe order."""
from __future__ import annotations

from .base import StageContext, StageReport
from .distill import apply_distill
from .low_rank import apply_low_rank
from .prune import apply_prune
from .quantize import apply_quantize
from .structured import apply_prune_depth, apply_prune_width

__all__ = ["StageContext", "StageReport", "apply_stage"]


def apply_stage(stage, model, ctx: StageContext) -> StageReport:
    from ..recipe import DistillStage, LowRankStage, PruneDepthStage, PruneStage, PruneWidthStage, QuantizeStage

    kinds = {QuantizeStage: ("quantize", apply_quantize), PruneStage: ("prune", apply_prune),
             PruneWidthStage: ("prune_width", apply_prune_width), PruneDepthStage: ("prune_depth", apply_prune_depth),
             LowRankStage: ("low_rank", apply_low_rank), DistillStage: ("distill", apply_distill)}
    if type(stage) not in kinds:
        raise TypeError(f"unknown stage {type(stage).__name__}")
    field, apply = kinds[type(stage)]
    return apply(getattr(stage, field), model, ctx)
