"""Which op's output feeds which linears inside a decoder block, per architecture family: where an AWQ scale on the
linears' input channels can be folded back so that the block computes the same function.

A producer is an RMSNorm (its weight is divided by the scale) or a linear (its output rows are divided by it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class ScaleMap:
    producer: str  # module path inside the block
    linears: tuple[str, ...]


def _maps(mlp_norm: str) -> tuple[ScaleMap, ...]:
    return (ScaleMap("input_layernorm", _ATTN_IN), ScaleMap("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleMap(mlp_norm, _MLP_IN), ScaleMap("mlp.up_proj", ("mlp.down_proj",)))


FAMILIES: dict[str, tuple[ScaleMap, ...]] = {
    "llama": _maps("post_attention_layernorm"),
    "mistral": _maps("post_attention_layernorm"),
    "qwen2": _maps("post_attention_layernorm"),
    "qwen3": _maps("post_attention_layernorm"),
    "gemma": _maps("post_attention_layernorm"),
    "gemma2": _maps("pre_feedforward_layernorm"),  # Gemma 2/3 normalize after attention too: the MLP's own norm
    "gemma3_text": _maps("pre_feedforward_layernorm"),
}
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")  # RMSNorm multiplies by (1 + weight)


class ScaleMapError(ValueError):
    """A model whose blocks do not match the table."""


def maps_for(model: nn.Module, block: nn.Module) -> list[ScaleMap]:
    """The maps that apply to `block`; a linear->linear map needs matching shapes (with grouped-query attention
    v_proj has fewer output rows than o_proj has inputs, so o_proj gets no scale)."""
    model_type = model.config.model_type
    table = FAMILIES.get(model_type)
    if table is None:
        raise ScaleMapError(f"awq: no scale mapping for model_type {model_type!r}; supported: "
                            f"{', '.join(sorted(FAMILIES))}")
    usable = []
    for m in table:
        try:
            producer = block.get_submodule(m.producer)
            linears = [block.get_submodule(n) for n in m.linears]
        except AttributeError as e:
            raise ScaleMapError(f"awq: the {model_type} mapping {m.producer} -> {', '.join(m.linears)} does not "
                                f"match the model's blocks ({e})") from None
        if isinstance(producer, nn.Linear) and producer.out_features != linears[0].in_features:
            continue
        usable.append(m)
    return usable


@torch.no_grad()
def fold(model: nn.Module, block: nn.Module, m: ScaleMap, scales: torch.Tensor) -> None:
    """Multiply the linears' input columns by `scales` and divide the producer's output by them."""
    s = scales.to(next(block.parameters()).device)
    for name in m.linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    producer = block.get_submodule(m.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    elif model.config.model_type in NORM_PLUS_ONE:
        w = producer.weight
        w.copy_(((1 + w.float()) / s - 1).to(w.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
