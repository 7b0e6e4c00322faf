"""What a model costs to run, along the resource dimensions of the efficient-LLM survey (arXiv 2401.00625):
computation (FLOPs per token), memory, energy, money and network (the bytes a device downloads).

Energy is read from hardware counters only: RAPL on CPUs (``/sys/class/powercap``), NVML on NVIDIA GPUs. Where
there is no readable counter the figure is the reason it is missing, never an estimate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

POWERCAP = Path("/sys/class/powercap")


# ----------------------------------------------------------------------------------------------- computation
def flops_per_token(model: nn.Module, context: int) -> dict[str, float]:
    """Multiply-adds x 2 of one decoded token at position `context`: every linear layer as stored (low-rank factors,
    pruned shapes), plus attention over `context` cached positions; the embedding lookup costs none.

    ``nonzero`` counts only the weights that are not zero (what a sparse kernel could skip)."""
    from ..kernels.module import FusedQuantLinear
    from ..quant.tensor import QuantLinear

    dense, nonzero = 0.0, 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n = m.in_features * m.out_features
            dense += 2 * n
            nonzero += 2 * int(torch.count_nonzero(m.weight.detach())) if m.weight.layout == torch.strided else 2 * n
        elif isinstance(m, QuantLinear):
            dense += 2 * m.in_features * m.out_features
            q = m.qweight
            nonzero += 2 * int(torch.count_nonzero(q.codes != q.zeros[:, q.group_index()]))
        elif isinstance(m, FusedQuantLinear):
            dense += 2 * m.in_features * m.out_features
            nonzero += 2 * m.in_features * m.out_features
    cfg = getattr(model, "config", None)
    attention = 0.0
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        # Scores q·k and the weighted sum of v, each 2 x context x head_dim per head and layer.
        attention = 4.0 * context * heads * head_dim * cfg.num_hidden_layers
    return {"linear": dense, "linear_nonzero": nonzero, "attention": attention, "total": dense + attention,
            "context": context}


# ----------------------------------------------------------------------------------------------- energy
class EnergyMeter:
    """Cumulative energy in joules from a hardware counter; `read()` differences give the energy of a span."""

    def __init__(self, source: str, reader) -> None:
        self.source, self._reader = source, reader

    def read(self) -> float:
        return self._reader()


def cpu_energy_meter(root: Path = POWERCAP) -> EnergyMeter | str:
    """The sum of the RAPL package domains, or why there is none. RAPL counts the whole package: other processes
    running at the same time are included."""
    domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.exists() else []
    if not domains:
        return f"not measurable here: no RAPL counter under {root}"
    counters = []
    for d in domains:
        f = d / "energy_uj"
        try:
            int(f.read_text())
            wrap = int((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").exists() else 2**32
        except (OSError, ValueError) as e:
            return f"not measurable here: {f} cannot be read ({e.__class__.__name__}; reading RAPL may need root)"
        counters.append((f, wrap))
    state = {str(f): [int(f.read_text()), 0] for f, _ in counters}  # last raw value, wraps so far

    def read() -> float:
        total = 0
        for f, wrap in counters:
            last = state[str(f)]
            raw = int(f.read_text())
            if raw < last[0]:  # the counter wrapped around since the last read
                last[1] += 1
            last[0] = raw
            total += raw + last[1] * wrap
        return total / 1e6

    return EnergyMeter("RAPL (" + ", ".join(d.name for d in domains) + ")", read)


def gpu_energy_meter(index: int = 0) -> EnergyMeter | str:
    """NVML's total energy counter of GPU `index` (Volta and newer), or why there is none."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return "not measurable here: NVML (the nvidia-ml-py package) is not installed"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as e:  # NVMLError subclasses: no driver, no GPU, counter not supported
        return f"not measurable here: NVML energy counter unavailable ({e})"
    return EnergyMeter("NVML total energy", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3)


# ----------------------------------------------------------------------------------------------- money
def cost_per_million_tokens(ms_per_token: float | None, price_per_hour: float | None) -> float | None:
    """What a million tokens decoded one at a time cost at `price_per_hour` for the machine (its currency)."""
    if ms_per_token is None or price_per_hour is None:
        return None
    return price_per_hour / 3600 * ms_per_token / 1000 * 1e6


def profile(entry: dict[str, Any], flops: dict[str, float] | None, price_per_hour: float | None) -> dict[str, Any]:
    """The resource profile of one report row (the baseline or an artifact) from what the run measured."""
    speed = entry.get("speed") or {}
    ms = speed.get("decode_ms_per_token")
    out: dict[str, Any] = {
        "flops_per_token": flops["total"] if flops else None,
        "flops_per_token_nonzero": flops["linear_nonzero"] + flops["attention"] if flops else None,
        "flops_context": flops["context"] if flops else None,
        "decode_ms_per_token": ms,
        "decode_tokens_per_s": 1000 / ms if ms else None,
        "prefill_tokens_per_s": speed.get("prefill_tokens_per_second"),
        "peak_memory_mb": speed.get("peak_rss_mb"),
        "download_bytes": (entry.get("size") or {}).get("bytes"),
        "energy_j_per_token": speed.get("energy_j_per_token", speed.get("energy") or "not measured (no speed run)"),
        "price_per_hour": price_per_hour,
        "cost_per_million_tokens": cost_per_million_tokens(ms, price_per_hour),
    }
    if speed.get("energy_source"):
        out["energy_source"] = speed["energy_source"]
    return out
