"""Run a model whose weights live on one device (the CPU) on another (a GPU) one decoder block at a time: the device
then holds the embedding, the head and a single block, not the whole model."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import decoder_layers


@contextmanager
def streamed(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Within the block, calling `model` computes on `device`: the modules outside the decoder blocks move there for
    the duration and each block moves there only for its own forward. Everything is back where it was afterwards."""
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    target = torch.device(device)
    if home.type == target.type and target.index in (None, home.index):
        yield model
        return
    inside = {id(m) for m in layers.modules()}
    outer = [m for m in model.modules() if id(m) not in inside]

    def arrive(block: nn.Module, args: tuple) -> None:
        block.to(target)

    def leave(block: nn.Module, args: tuple, output: object) -> None:
        block.to(home)

    hooks = [h for block in layers for h in (block.register_forward_pre_hook(arrive),
                                             block.register_forward_hook(leave))]
    _move(outer, target)
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        layers.to(home)
        _move(outer, home)


def _move(modules: list[nn.Module], device: torch.device) -> None:
    """Move the modules' own parameters and buffers (not their children's); a tied parameter moves once, for all."""
    for m in modules:
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
