"""Per-input-column activation statistics of linear layers over calibration data (llama.cpp's "importance
matrix": the mean of x² for every input column of every matrix multiplication)."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .quant.tensor import QuantLinear
from .sequential import StopForward, computing_in

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_squared_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu",
                        compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{linear layer name: mean over calibration tokens of x² per input column}, for every linear layer and the
    output projection, from one forward pass of `model` as it is now (compressed layers included), stopped at the
    output projection's input: the logits ([batch, tokens, vocabulary], 0.8 GB per batch of 8 x 512 tokens for a
    49k vocabulary) are never computed. With `compute_dtype`, the pass multiplies in it (calibration.precision)."""
    # The sums are allocated before the pass and added to in place, and no temporary as large as x is made: tensors
    # born between a forward's large temporaries pin holes in the heap, which grew by 1-3 GB on SmolLM2.
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            for rows in x.split(256):  # temporaries of 256 rows (also faster than one x-sized square: cache)
                sums[name] += rows.float().square().sum(0)
            counts[name] += x.shape[0]
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)):
            sums[name] = torch.zeros(module.in_features, dtype=torch.float32, device=device)
            counts[name] = 0
            handles.append(module.register_forward_pre_hook(hook(name)))
    head = model.get_output_embeddings()
    if head is not None:  # after its statistics hook: hooks run in the order they were registered

        def stop(module, args):  # its input is seen: the logits themselves are not needed
            raise StopForward
        handles.append(head.register_forward_pre_hook(stop))
    start = time.perf_counter()
    batches = windows.split(batch_size)
    try:
        for i, batch in enumerate(batches):
            try:
                with computing_in(device, compute_dtype):
                    model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
            elapsed = time.perf_counter() - start
            log.info("importance matrix: batch %d/%d, elapsed %.0fs, ETA %.0fs", i + 1, len(batches), elapsed,
                     elapsed / (i + 1) * (len(batches) - i - 1))
    finally:
        for h in handles:
            h.remove()
    return {name: (s / counts[name]).cpu() for name, s in sums.items() if counts[name]}
