"""What the ONNX decoder graph needs to know about a transformers model: one table row per supported `model_type`,
read into a `DecoderSpec` of plain numbers. Everything architecture-specific that the graph builder uses is here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + weight)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    sandwich: bool = False  # Gemma 2/3: norms after attention and MLP too
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3, Gemma 3)
    query_pre_attn_scalar: bool = False  # attention scale from config.query_pre_attn_scalar (Gemma 2/3)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(norm_plus_one=True, embed_scale=True),
    "gemma2": Family(norm_plus_one=True, embed_scale=True, sandwich=True, query_pre_attn_scalar=True),
    "gemma3_text": Family(norm_plus_one=True, embed_scale=True, sandwich=True, qk_norm=True,
                          query_pre_attn_scalar=True),
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu": "gelu"}


class ArchitectureError(ValueError):
    """A model the ONNX exporter has no graph for."""


@dataclass(frozen=True)
class DecoderSpec:
    family: Family
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    activation: str
    attn_scale: float | None  # None: 1/sqrt(head_dim)
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer: sliding window (keys a query sees, itself included) or None
    rope_kind: tuple[str, ...]  # per layer: the layer type whose rotary table it uses
    tied: bool


def spec_for(model: nn.Module) -> DecoderSpec:
    c = model.config
    family = FAMILIES.get(c.model_type)
    if family is None:
        raise ArchitectureError(f"ONNX export: model_type {c.model_type!r} has no graph here; supported: "
                                f"{', '.join(sorted(FAMILIES))}")
    act_name = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    activation = ACTIVATIONS.get(act_name)
    if activation is None:
        raise ArchitectureError(f"ONNX export: activation {act_name!r} is not supported ({', '.join(ACTIVATIONS)})")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_types = tuple(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    window = getattr(c, "sliding_window", None)
    if c.model_type == "mistral" or (c.model_type in ("qwen2", "qwen3") and getattr(c, "use_sliding_window", False)):
        # These apply their window to every layer that has one; Qwen's max_window_layers is not modelled.
        if c.model_type != "mistral" and getattr(c, "max_window_layers", c.num_hidden_layers) < c.num_hidden_layers:
            raise ArchitectureError("ONNX export: Qwen sliding window limited to some layers is not supported")
        windows = tuple(window for _ in layer_types)
    else:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise ArchitectureError(f"ONNX export: layer types {sorted(set(layer_types))} are not supported "
                                "(full_attention, sliding_attention)")
    return DecoderSpec(
        family=family, layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim=head_dim,
        vocab=c.vocab_size, eps=float(c.rms_norm_eps), activation=activation,
        attn_scale=float(c.query_pre_attn_scalar) ** -0.5 if family.query_pre_attn_scalar else None,
        attn_softcap=getattr(c, "attn_logit_softcapping", None) or None,
        final_softcap=getattr(c, "final_logit_softcapping", None) or None,
        windows=windows, rope_kind=layer_types, tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


def rotary_tables(model: nn.Module, spec: DecoderSpec, positions: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin tables [positions, head_dim/2] per layer type, from the model's own rotary module, so every rope
    variant with fixed tables (linear, llama3, yarn) comes out as transformers computes it."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise ArchitectureError("ONNX export: the model has no rotary embedding module (model.rotary_emb)")
    if getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3", "yarn") and not isinstance(
            rotary.rope_type, dict):
        raise ArchitectureError(f"ONNX export: rope type {rotary.rope_type!r} depends on the sequence length at run "
                                "time; supported: default, linear, llama3, yarn")
    tables = {}
    pos = torch.arange(positions, dtype=torch.float32)
    for kind in sorted(set(spec.rope_kind)):
        inv_freq = getattr(rotary, f"{kind}_inv_freq", None)
        scaling = getattr(rotary, f"{kind}_attention_scaling", None)
        if inv_freq is None:
            inv_freq, scaling = rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0)
        if inv_freq.numel() * 2 != spec.head_dim:
            raise ArchitectureError(f"ONNX export: partial rotary ({inv_freq.numel() * 2} of {spec.head_dim} "
                                    "dimensions) is not supported")
        angles = pos[:, None] * inv_freq.float()[None, :]  # float32 products, as transformers computes them
        tables[kind] = (angles.cos() * scaling, angles.sin() * scaling)
    return tables
