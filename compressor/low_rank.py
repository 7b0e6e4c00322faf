"""The factorized linear layer a low-rank stage leaves behind, and the ways back to an ordinary model.

``LowRankLinear`` computes ``second(first(x))``: ``first`` is an nn.Linear in_features -> rank without bias,
``second`` an nn.Linear rank -> out_features carrying the original bias. Both are ordinary linear layers, so a later
stage sees them as it sees any other: a quantize stage turns either into a QuantLinear, a prune stage zeroes their
weights, a distill stage trains them. A checkpoint stores them as ``<name>.first.*`` and ``<name>.second.*`` with
the ranks in config.json under ``LOW_RANK_KEY``; `install` rebuilds the layers before the tensors are loaded.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

LOW_RANK_KEY = "compressor_low_rank"  # config.json: {"layers": {qualified name: rank}}


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> "LowRankLinear":
        """``first`` [rank, in], ``second`` [out, rank]: the layer computing x firstᵀ secondᵀ + bias."""
        rank, in_f = first.shape
        out_f = second.shape[0]
        if second.shape[1] != rank:
            raise ValueError(f"factors {tuple(first.shape)} and {tuple(second.shape)} do not chain")
        layer = cls(in_f, out_f, rank, bias=bias is not None, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if bias is not None:
                layer.second.bias.copy_(bias)
        layer.requires_grad_(False)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """second · first: the [out, in] matrix the layer applies (quantized factors dequantized first)."""
        return self.second.weight.to(dtype) @ self.first.weight.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The product, for code that reads `.weight` (dtype probes, checks); not a parameter."""
        return self.dense_weight(self.second.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def dense_linear(layer: LowRankLinear, dtype: torch.dtype = torch.float32) -> nn.Linear:
    weight = layer.dense_weight(torch.float32)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    dense.requires_grad_(False)
    return dense


def merge(model: nn.Module) -> list[str]:
    """Replace every LowRankLinear of `model` by the dense nn.Linear it computes; returns the merged names."""
    layers = low_rank_layers(model)
    _replace_with_dense(model, layers)
    return list(layers)


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[list[str]]:
    """`model` with its low-rank layers merged to dense for the duration (for writers of formats that have no
    factorized layer), restored afterwards; only the merged layers take extra memory."""
    from .stages.base import set_submodule

    layers = low_rank_layers(model)
    try:
        _replace_with_dense(model, layers)  # a failure half-way still restores every layer below
        yield list(layers)
    finally:
        for name, layer in layers.items():
            set_submodule(model, name, layer)


def _replace_with_dense(model: nn.Module, layers: dict[str, LowRankLinear]) -> None:
    from .stages.base import set_submodule

    for name, layer in layers.items():
        set_submodule(model, name, dense_linear(layer))


def ranks_config(model: nn.Module) -> dict[str, Any] | None:
    """What config.json records about the model's factorized layers (None when it has none)."""
    layers = low_rank_layers(model)
    return {"layers": {name: layer.rank for name, layer in layers.items()}} if layers else None


def install(model: nn.Module, config: dict[str, Any], where: str = "config.json") -> None:
    """Replace the linear layers a checkpoint's `LOW_RANK_KEY` entry names by empty LowRankLinear layers of the
    recorded ranks, so that the checkpoint's factor tensors load into them."""
    from .stages.base import set_submodule

    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: {LOW_RANK_KEY} must hold {{'layers': {{name: rank}}}}")
    for name, rank in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: {LOW_RANK_KEY} names {name!r}, which the model does not have") from None
        if not isinstance(module, nn.Linear) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}: {LOW_RANK_KEY}: {name} (a {type(module).__name__}) with rank {rank!r}; "
                             "expected a linear layer and a positive integer rank")
        set_submodule(model, name, LowRankLinear(module.in_features, module.out_features, rank,
                                                 bias=module.bias is not None, device=module.weight.device,
                                                 dtype=module.weight.dtype))
