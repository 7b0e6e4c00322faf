"""Batch-1 decoding of Llama-architecture models (Llama, Mistral, Qwen2) with a static KV cache, so that a whole
decode step is captured once as a CUDA graph and replayed: what a deployment's decode loop costs on a GPU, without
the Python overhead of `generate` that hides the difference between fp16 and low-bit weights on small models.

The step reads the model's own modules (whatever their kind: nn.Linear, FusedQuantLinear, 2:4 sparse), with the
query/key/value and gate/up projections merged where their weights can be concatenated, and the small per-token
operations fused (compressor.kernels.fused_ops): RoPE, the cache writes and attention are one kernel, the residual
add and RMSNorm another, and the SwiGLU runs inside the down projection's kernel where that kernel takes it. On
compute capability 9.0+ the step's Triton kernels are programmatic dependent launches (compressor.kernels.pdl).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import fused_ops, triton_available
from ..kernels.module import FusedQuantLinear

ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    pass


def merge_linears(mods: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([m(x) for m in mods], -1)``: concatenated weights where the kinds allow it."""
    if all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in mods):  # dense (not 2:4 sparse) weights
        w = torch.cat([m.weight.detach() for m in mods])
        merged = nn.Linear(w.shape[1], w.shape[0], bias=mods[0].bias is not None, device=w.device, dtype=w.dtype)
        merged.weight = nn.Parameter(w, requires_grad=False)
        if merged.bias is not None:
            merged.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        return merged
    if all(isinstance(m, FusedQuantLinear) for m in mods) and _same_quantization(mods):
        kws = [m.kernel_weight() for m in mods]
        kw = kws[0]
        kw = type(kw)(torch.cat([k.qweight for k in kws], 1), torch.cat([k.scales for k in kws], 1),
                      torch.cat([k.zeros for k in kws], 1), kw.perm, kw.bits, kw.group_size, kw.in_features,
                      sum(k.out_features for k in kws))
        bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        return FusedQuantLinear(kw, bias)
    return _Concat(mods)


def _same_quantization(mods: list[FusedQuantLinear]) -> bool:
    first = mods[0]
    return all(m.bits == first.bits and m.group_size == first.group_size and (m.bias is None) == (first.bias is None)
               and ((m.perm is None and first.perm is None) or (m.perm is not None and first.perm is not None
                                                                and torch.equal(m.perm, first.perm)))
               for m in mods)


class _Concat(nn.Module):
    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


class StaticDecoder:
    """Greedy decoding through `model` from position `start`; `step()` computes one token and advances."""

    def __init__(self, model: nn.Module, max_len: int, fused: bool | None = None,
                 fused_attention: bool | None = None) -> None:
        cfg = model.config
        if cfg.model_type not in ARCHITECTURES:
            raise UnsupportedModel(f"{cfg.model_type!r}: the static decoder runs {ARCHITECTURES}")
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < max_len:
            raise UnsupportedModel(f"sliding window {window} < {max_len} positions")
        inner = model.model
        self.embed, self.head = inner.embed_tokens, model.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        w = self.embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.fused = (w.is_cuda and triton_available()) if fused is None else fused
        # Attention as one Triton kernel (RoPE, cache writes, attention), or the rotation in PyTorch and SDPA.
        self.fused_attention = self.fused if fused_attention is None else fused_attention
        self.blocks = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.blocks.append({"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                                "qkv": merge_linears([a.q_proj, a.k_proj, a.v_proj]), "o": a.o_proj,
                                "gate_up": merge_linears([m.gate_proj, m.up_proj]), "down": m.down_proj})
        self.final_norm = inner.norm.weight
        n = len(self.blocks)
        shape = (n, 1, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.arange(max_len, device=self.device)
        cos, sin = inner.rotary_emb(w[:1], positions[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.positions = positions
        self.max_len = max_len
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def map_linears(self, fn) -> None:
        """Replace each merged projection by ``fn(module)`` (e.g. to make it 2:4 sparse)."""
        for b in self.blocks:
            for key in ("qkv", "o", "gate_up", "down"):
                b[key] = fn(b[key])

    def reset(self, token: int, position: int) -> None:
        self.tokens.fill_(token)
        self.pos.fill_(position)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Logits [1, vocab] for `tokens` at `pos`; then tokens = argmax, pos += 1 (all on the device)."""
        h = self.embed(self.tokens)
        mask = None if self.fused_attention else self.positions <= self.pos
        r = fused_ops.add_rmsnorm(h, None, self.blocks[0]["ln1"], self.eps, self.fused)
        for i, b in enumerate(self.blocks):
            attn = fused_ops.decode_attention(b["qkv"](r), self.cos, self.sin, self.pos, self.k_cache[i],
                                              self.v_cache[i], self.heads, self.kv_heads, self.fused_attention,
                                              mask=mask)
            r = fused_ops.add_rmsnorm(h, b["o"](attn), b["ln2"], self.eps, self.fused)
            gate_up, down = b["gate_up"](r), b["down"]
            if isinstance(down, FusedQuantLinear):  # the SwiGLU may run inside the down projection's kernel
                delta = down.forward_swiglu(gate_up, self.fused)
            else:
                delta = down(fused_ops.silu_mul(gate_up, self.fused))
            nxt = self.blocks[i + 1]["ln1"] if i + 1 < len(self.blocks) else self.final_norm
            r = fused_ops.add_rmsnorm(h, delta, nxt, self.eps, self.fused)
        logits = self.head(r)
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def capture(self, warmup: int = 3) -> None:
        """Record one step as a CUDA graph (after `warmup` eager steps, which also tune the kernels)."""
        tokens, pos = self.tokens.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)

    def run(self, steps: int) -> torch.Tensor:
        """`steps` decode steps (graph replays when captured); the logits of the last one."""
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.logits = self.step()
        return self.logits
