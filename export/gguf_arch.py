"""How a transformers model maps onto llama.cpp's GGUF: architecture names, tensor names and hyperparameter keys.

One table, one row per supported `model_type`. Everything architecture-specific that the GGUF writer needs is here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# transformers module path inside a decoder block -> GGUF tensor name inside `blk.N.`
_COMMON_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 2/3 normalize around both sublayers: the post-attention norm is not the pre-MLP norm there.
_SANDWICH_BLOCK = {**_COMMON_BLOCK, "post_attention_layernorm": "post_attention_norm",
                   "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # llama.cpp's architecture
    block: dict[str, str]
    rope_interleaved: bool = False  # llama.cpp rotates adjacent pairs: q/k rows are permuted from the HF layout
    norm_plus_one: bool = False  # HF stores (weight - 1) for Gemma's RMSNorm; llama.cpp wants the weight itself
    query_is_hidden_wide: bool = False  # llama.cpp's loader assumes heads x head_dim = hidden_size
    extra: Callable[[Any], dict[str, Any]] = field(default=lambda config: {})


def _gemma2_extra(c: Any) -> dict[str, Any]:
    return {"attn_logit_softcapping": c.attn_logit_softcapping, "final_logit_softcapping": c.final_logit_softcapping,
            "attention.sliding_window": c.sliding_window}


def _gemma3_extra(c: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"attention.sliding_window": c.sliding_window}
    types = getattr(c, "layer_types", None)
    if types:
        out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
    local_base = _rope_theta(c, "sliding_attention")
    if local_base is not None:
        out["rope.freq_base_swa"] = local_base
    return out


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", _COMMON_BLOCK, rope_interleaved=True),
    "mistral": Arch("llama", _COMMON_BLOCK, rope_interleaved=True),
    "qwen2": Arch("qwen2", _COMMON_BLOCK, query_is_hidden_wide=True),
    "qwen3": Arch("qwen3", _COMMON_BLOCK),
    "gemma": Arch("gemma", _COMMON_BLOCK, norm_plus_one=True),
    "gemma2": Arch("gemma2", _SANDWICH_BLOCK, norm_plus_one=True, extra=_gemma2_extra),
    "gemma3_text": Arch("gemma3", _SANDWICH_BLOCK, norm_plus_one=True, extra=_gemma3_extra),
}


class ArchitectureError(ValueError):
    """A model that the GGUF writer has no mapping for."""


def arch_for(config: Any) -> Arch:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ArchitectureError(f"GGUF export: model_type {config.model_type!r} has no GGUF mapping; supported: "
                                f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def gguf_tensor_name(hf_name: str, arch: Arch) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None for a tensor GGUF does not hold."""
    module, _, kind = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        rest = module[len("model.layers."):]
        index, _, sub = rest.partition(".")
        mapped = arch.block.get(sub)
        return f"blk.{index}.{mapped}.{kind}" if mapped else None
    mapped = TOP.get(module)
    return f"{mapped}.{kind}" if mapped else None


def hyperparameters(config: Any, arch: Arch) -> dict[str, Any]:
    """Keys under `{arch}.` in the GGUF header."""
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    out: dict[str, Any] = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": c.vocab_size,
    }
    base = _rope_theta(c, "full_attention")
    if base is not None:
        out["rope.freq_base"] = base
    scaling = _rope_scaling(c)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "linear":
        out["rope.scaling.type"] = "linear"
        out["rope.scaling.factor"] = float(scaling["factor"])
    elif kind not in ("default", "llama3"):
        raise ArchitectureError(f"GGUF export: rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    out.update(arch.extra(c))
    return out


def extra_tensors(config: Any) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that transformers computes on the fly: Llama 3's per-frequency rope factors."""
    scaling = _rope_scaling(config) or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = _rope_theta(config, "full_attention") or 10000.0
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


def _rope_scaling(c: Any) -> dict[str, Any] | None:
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict):
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        return params
    return getattr(c, "rope_scaling", None)


def _rope_theta(c: Any, layer_type: str) -> float | None:
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict):
        if layer_type in params and isinstance(params[layer_type], dict):
            params = params[layer_type]
        elif layer_type != "full_attention":
            return None
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = getattr(c, "rope_theta", None) if layer_type == "full_attention" else getattr(c, "rope_local_base_freq",
                                                                                            None)
    return float(theta) if theta is not None else None


def to_gguf_layout(hf_name: str, w: torch.Tensor, config: Any, arch: Arch) -> torch.Tensor:
    """Transform a float tensor the way llama.cpp expects it (rope row order for Llama, Gemma's norm offset)."""
    if arch.rope_interleaved and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                   "k_proj.bias")):
        heads = config.num_attention_heads if "q_proj" in hf_name else (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        return permute_rope_rows(w, heads)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return w + 1
    return w


def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores each head's rotary dimensions as [first halves | second halves]; llama.cpp's Llama wants them as
    adjacent pairs. Works on rows only, so quantized rows (codes, scales, zeros) move with their data."""
    rows = w.shape[0]
    return (w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape))
