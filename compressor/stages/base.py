from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models import decoder_layers, output_projection
from ..resume import BlockCheckpoints

if TYPE_CHECKING:
    from ..lazy import StreamedBlocks


class ShapeError(ValueError):
    """A layer shape that the requested compression or export cannot represent."""


@dataclass
class StageContext:
    """What a stage may use besides the model: calibration windows and where to compute."""

    calibration: torch.Tensor | None = None  # [samples, seq_len] token ids
    batch_size: int = 8
    device: str = "cpu"
    compute_dtype: torch.dtype | None = None  # calibration passes multiply in it (sequential.calibration_dtype)
    teacher: nn.Module | None = None  # distill: the model before the stage the recipe names
    distill_windows: torch.Tensor | None = None  # distill: its own training text, when the recipe gives one
    checkpoint_dir: Path | None = None  # where layer-wise passes keep finished blocks (compressor.resume)
    stream: StreamedBlocks | None = None  # when the model is read block by block (compressor.lazy)

    def checkpoints(self, name: str, report: "StageReport") -> BlockCheckpoints | None:
        """Block checkpoints for the layer-wise pass `name` of a stage, or None when the run keeps none."""
        if self.checkpoint_dir is None:
            return None
        return BlockCheckpoints(self.checkpoint_dir / name, report.layers)


@dataclass
class StageReport:
    kind: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # one row per changed layer

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": round(self.seconds, 3), "summary": self.summary, "layers": self.layers}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def select_linears(model: nn.Module, cfg: Any, section: str = "quantize") -> dict[str, nn.Linear]:
    """Linear layers of the decoder blocks (and the output projection if `cfg.lm_head`) that a stage config with
    `include` / `exclude` regexes selects; `section` names the recipe section in errors."""
    layers = decoder_layers(model)
    chosen: dict[str, nn.Linear] = {}
    prefix = {id(b): n for n, b in model.named_modules()}
    for block in layers:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                full = f"{prefix[id(block)]}.{name}"
                if _selected(full, cfg):
                    chosen[full] = module
    if getattr(cfg, "lm_head", False):
        head = output_projection(model)
        if head is None:
            raise ShapeError(f"{section}.lm_head: the model has no linear output projection named lm_head")
        chosen["lm_head"] = head
    if not chosen:
        raise ShapeError(f"{section}: no linear layer matches include/exclude "
                         f"(include={list(cfg.include)}, exclude={list(cfg.exclude)})")
    return chosen


def _selected(name: str, cfg: Any) -> bool:
    if cfg.include and not any(re.search(p, name) for p in cfg.include):
        return False
    return not any(re.search(p, name) for p in cfg.exclude)
