"""Compression stages: plain configs (compressor.recipe) applied to a model in recipe order."""
from __future__ import annotations

from .base import StageContext, StageReport
from .quantize import apply_quantize

__all__ = ["StageContext", "StageReport", "apply_stage"]


def apply_stage(stage, model, ctx: StageContext) -> StageReport:
    from ..recipe import QuantizeStage

    if isinstance(stage, QuantizeStage):
        return apply_quantize(stage.quantize, model, ctx)
    raise TypeError(f"unknown stage {type(stage).__name__}")
