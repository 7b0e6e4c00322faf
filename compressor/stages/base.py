from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StageContext:
    """What a stage may use besides the model: calibration windows and where to compute."""

    calibration: torch.Tensor | None = None  # [samples, seq_len] token ids
    batch_size: int = 8
    device: str = "cpu"


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
