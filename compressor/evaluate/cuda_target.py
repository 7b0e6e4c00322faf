"""The `cuda` evaluation target: the torch model on a CUDA GPU, in the forms a GPU deployment would run it.

Variants, each measured alone on the card against the float16 baseline on the same windows:
- ``fp16 baseline``;
- ``quantized (fused kernels)``: QuantLinear layers run through the project's fused dequantize-GEMM kernels;
- ``2:4 sparse``: linear layers whose weights are 2:4 sparse run through PyTorch's semi-structured sparse matmul
  (compute capability 8.0 or newer);
- ``compressed fp16`` for any other compressed model (pruned to smaller shapes, low-rank).
Decode is ms per token at batch 1 after a prompt: for Llama-architecture models one CUDA graph per step
(compressor.evaluate.static_decode), for the others the transformers forward with its KV cache, eagerly. Prefill is
tokens/s of one forward over a prompt; peak memory is the most the variant held during prefill and decode (its
weights included), beyond what was allocated before it was loaded.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..quant.tensor import QuantLinear
from .accuracy import TorchRuntime, compare

log = logging.getLogger(__name__)


def measure(baseline: nn.Module, compressed: nn.Module | None, windows: torch.Tensor, *, prompt_tokens: int,
            decode_tokens: int, prefill_tokens: int, repeats: int, batch_size: int = 1,
            price_per_hour: float | None = None) -> dict[str, Any]:
    """The target's section of the report; ``{"skipped": why}`` where no suitable GPU is present."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU visible to torch"}
    props = torch.cuda.get_device_properties(0)
    out: dict[str, Any] = {"device": props.name, "dtype": "float16", "variants": {}, "notes": []}
    base = _to_gpu(baseline)
    variants = [("fp16 baseline", None)]
    if compressed is not None:
        if any(isinstance(m, QuantLinear) for m in compressed.modules()):
            variants.append(("quantized (fused kernels)", "quantized"))
        elif _two_four_layers(compressed):
            variants.append(("2:4 sparse", "sparse"))
        else:
            variants.append(("compressed fp16", "plain"))
    for name, kind in variants:
        try:
            model, note = (base, None) if kind is None else _variant(compressed, kind, props)
        except _Skip as e:
            out["variants"][name] = {"skipped": str(e)}
            continue
        row: dict[str, Any] = {}
        if note:
            row["note"] = note
        if model is not base:
            acc = compare(TorchRuntime("fp16 baseline", base, "cuda"), [TorchRuntime(name, model, "cuda")], windows,
                          batch_size)
            row["accuracy"] = acc[name]
            out.setdefault("baseline_accuracy", acc["fp16 baseline"])
        row.update(_speed(model, windows, prompt_tokens, decode_tokens, prefill_tokens, repeats))
        out["variants"][name] = row
        log.info("cuda target: %s: %.2f ms/token, prefill %.0f tokens/s", name, row["decode_ms_per_token"],
                 row["prefill_tokens_per_s"])
        if model is not base:
            del model
            torch.cuda.empty_cache()
    if len(variants) == 1:
        out["baseline_accuracy"] = compare(TorchRuntime("fp16 baseline", base, "cuda"), [], windows,
                                           batch_size)["fp16 baseline"]
    ref = out["variants"]["fp16 baseline"]["decode_ms_per_token"]
    from .resources import cost_per_million_tokens

    for row in out["variants"].values():
        if "decode_ms_per_token" in row:
            row["decode_speedup"] = ref / row["decode_ms_per_token"]
            row["cost_per_million_tokens"] = cost_per_million_tokens(row["decode_ms_per_token"], price_per_hour)
    del base
    torch.cuda.empty_cache()
    return out


class _Skip(Exception):
    pass


def _to_gpu(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cuda", torch.float16).eval()


def _variant(compressed: nn.Module, kind: str, props: Any) -> tuple[nn.Module, str | None]:
    model = _to_gpu(compressed)
    if kind == "quantized":
        from ..kernels import triton_available, use_fused_kernels

        if not triton_available():
            raise _Skip("Triton is not installed: the fused kernels cannot run")
        kept = use_fused_kernels(model, torch.float16)
        if kept:
            return model, (f"{len(kept)} layers dequantize per call (not packable for the kernels: "
                           f"{next(iter(kept.values()))})")
        return model, None
    if kind == "sparse":
        if props.major < 8:
            raise _Skip(f"semi-structured sparsity needs compute capability 8.0+, this GPU has "
                        f"{props.major}.{props.minor}")
        from torch.sparse import to_sparse_semi_structured

        done, failed = 0, 0
        for m in model.modules():
            if type(m) is nn.Linear and _is_two_four(m.weight):
                try:
                    m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
                    done += 1
                except (RuntimeError, ValueError):  # shapes the sparse kernels reject stay dense
                    failed += 1
        return model, f"{done} layers semi-structured sparse" + (f", {failed} left dense" if failed else "")
    return model, None


def _is_two_four(w: torch.Tensor) -> bool:
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(-1, 4) == 0).sum(1) >= 2).all())


def _two_four_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m) is nn.Linear and _is_two_four(m.weight))


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def _speed(model: nn.Module, windows: torch.Tensor, prompt_tokens: int, decode_tokens: int, prefill_tokens: int,
           repeats: int) -> dict[str, Any]:
    from .static_decode import StaticDecoder, UnsupportedModel

    flat = windows.reshape(-1)
    prefill_tokens = min(prefill_tokens, flat.numel())
    prefill = flat[:prefill_tokens].view(1, -1).to("cuda")
    prompt = flat[:prompt_tokens].view(1, -1).to("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    torch.cuda.reset_peak_memory_stats()
    model(prefill, use_cache=False)  # warm-up (and kernel tuning)
    prefill_s = _timed(lambda: model(prefill, use_cache=False), repeats)
    peak = torch.cuda.max_memory_allocated() - before + weights
    try:
        dec = StaticDecoder(model, max_len=prompt.shape[1] + decode_tokens + 8)
        for i, t in enumerate(prompt[0].tolist()):  # the prompt, one position at a time, fills the cache
            dec.reset(t, i)
            dec.step()
        start_token = int(dec.tokens)
        dec.capture()

        def decode() -> None:
            dec.reset(start_token, prompt.shape[1])
            dec.run(decode_tokens)
        how = "CUDA graph per step (static KV cache)"
    except UnsupportedModel as e:
        dec = None

        def decode() -> None:
            out = model(prompt, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_tokens):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        how = f"transformers forward with KV cache, eager ({e})"
    decode()
    from .resources import gpu_energy_meter

    meter = gpu_energy_meter()
    before = None if isinstance(meter, str) else meter.read()
    seconds = _timed(decode, repeats)
    energy: dict[str, Any] = {"energy": meter} if isinstance(meter, str) else {
        "energy_j_per_token": (meter.read() - before) / (repeats * decode_tokens), "energy_source": meter.source}
    if dec is None:  # the eager loop's time includes its prompt: take the prompt's forward out
        seconds -= _timed(lambda: model(prompt, use_cache=True), repeats)
    return {"decode_ms_per_token": seconds * 1000 / decode_tokens, "decode_method": how,
            "prefill_tokens_per_s": prefill_tokens / prefill_s, "peak_gpu_bytes": int(peak),
            "weights_bytes": int(weights), **energy}
