"""Per-input-column activation statistics of linear layers over calibration data (llama.cpp's "importance
matrix": the mean of x² for every input column of every matrix multiplication)."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .quant.tensor import QuantLinear

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_squared_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                        device: str = "cpu") -> dict[str, torch.Tensor]:
    """{linear layer name: mean over calibration tokens of x² per input column}, for every linear layer and the
    output projection, from one forward pass of `model` as it is now (compressed layers included)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)):
            handles.append(module.register_forward_pre_hook(hook(name)))
    start = time.perf_counter()
    batches = windows.split(batch_size)
    try:
        for i, batch in enumerate(batches):
            model(input_ids=batch.to(device), use_cache=False)
            elapsed = time.perf_counter() - start
            log.info("importance matrix: batch %d/%d, elapsed %.0fs, ETA %.0fs", i + 1, len(batches), elapsed,
                     elapsed / (i + 1) * (len(batches) - i - 1))
    finally:
        for h in handles:
            h.remove()
    return {name: (s / counts[name]).cpu() for name, s in sums.items()}
