"""Checkpoints of a run in progress, so that `compress run --resume` continues a crashed or killed run where it
stopped instead of starting over.

They live beside the run folder, in ``.<name>.resume/`` (the run folder itself appears only when a run is complete):

- ``stages/<key>/``: the model after each finished stage, in the stage cache's format (compressor.stage_cache);
- ``blocks/<key>/<pass>/block-0007.safetensors``: each decoder block finished by a layer-wise pass (GPTQ, SparseGPT,
  Wanda) of the stage in progress: the block's tensors, which of its layers are quantized, and the stage's report
  rows for it, in one file written atomically.

``<key>`` is the stage's content key (model weights, calibration windows, stages up to this one, seed, device, code):
checkpoints of another recipe, model or code version are never reused. On resume the finished blocks are loaded
instead of recomputed and the calibration activations are carried through them again, so the remaining blocks see
exactly the inputs the uninterrupted run gave them and the artifacts come out byte-identical. The folder is removed
when the run completes.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .stage_cache import install_quantized, quantized_layout

log = logging.getLogger(__name__)


def folder_for(output: Path) -> Path:
    return output.with_name(f".{output.name}.resume")


def describe(folder: Path) -> str:
    """What an interrupted run left, in words (for the message that offers --resume)."""
    stages = [p for p in (folder / "stages").glob("*") if (p / "meta.json").is_file()]
    blocks = list((folder / "blocks").glob("*/*/block-*.safetensors"))
    return f"{len(stages)} finished stage(s) and {len(blocks)} finished block(s)"


class BlockCheckpoints:
    """The finished blocks of one layer-wise pass; `report_rows` is the list the pass appends its per-layer rows
    to (each row has the layer's qualified "name")."""

    def __init__(self, folder: Path, report_rows: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.rows = report_rows
        self.restored = 0

    def _file(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}.safetensors"

    def restore(self, index: int, block: nn.Module) -> bool:
        """Load block `index` as the interrupted run left it (its report rows too); False if it was not finished."""
        path = self._file(index)
        if not path.is_file():
            return False
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["compressor"])
        device = next(block.parameters()).device
        empty = device.type == "meta"  # a block dropped from memory (compressor.lazy): its tensors are replaced
        if empty:
            device = torch.device("cpu")
        install_quantized(block, meta["quantized"], "meta" if empty else device)
        block.load_state_dict(load_file(path, device=str(device)), strict=True, assign=empty)
        self.rows.extend(meta["rows"])
        self.restored += 1
        return True

    def store(self, index: int, block: nn.Module, prefix: str) -> None:
        from safetensors.torch import save_file

        rows = [r for r in self.rows if str(r.get("name", "")).startswith(prefix + ".")]
        meta = {"quantized": quantized_layout(block), "rows": rows}
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in block.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".block-{index:04d}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_file(state, tmp, metadata={"compressor": json.dumps(meta, default=str)})
            os.replace(tmp, self._file(index))  # a kill leaves either no file or a whole one
        finally:
            tmp.unlink(missing_ok=True)
