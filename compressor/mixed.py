"""Mixed precision: measure each linear layer's sensitivity at every allowed width, then choose one width per layer
that meets an average bits-per-weight target with the least predicted KL divergence.

Sensitivity comes from one forward and backward pass over calibration windows on the model as the stage finds it:
the input second moment of every chosen layer and the Fisher diagonal of its output (labels sampled from the model's
own distribution, so the statistic measures departure from the model, not from the text). Each candidate width is
scored by the predicted KL of rounding the layer to it (compressor.algorithms.sensitivity); the widths are then
allocated under the budget (compressor.algorithms.bit_allocation). The stage then quantizes each layer at its width
with the recipe's method, and every exporter writes each layer at its own width.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .algorithms.bit_allocation import AllocationError, allocate
from .algorithms.sensitivity import predicted_kl
from .quant.tensor import quantize_rtn
from .recipe import QuantizeConfig
from .sequential import HessianAccumulator, computing_in

log = logging.getLogger(__name__)


class MixedPrecisionError(ValueError):
    """A mixed-precision target that the allowed widths cannot meet."""


def bits_per_weight(bits: int, group_size: int, symmetric: bool, in_features: int | None = None) -> float:
    """Stored bits per weight of a width: the code, plus per group a float16 scale and (asymmetric) a zero point.
    Per-channel groups (-1) cost nothing extra when `in_features` is unknown."""
    group = in_features if group_size == -1 else group_size
    if group is None:
        return float(bits)
    return bits + 16 / group + (0 if symmetric else bits / group)


def layer_bits(shape: tuple[int, int], width: tuple[int, int], symmetric: bool) -> float:
    out_f, in_f = shape
    return out_f * in_f * bits_per_weight(width[0], width[1], symmetric, in_f)


def check_target(shapes: dict[str, tuple[int, int]], cfg: QuantizeConfig) -> None:
    """Refuse, before calibration, a target the allowed widths cannot meet on these layers."""
    widths = cfg.mixed.widths(cfg.group_size)
    weights = sum(o * i for o, i in shapes.values())
    least = sum(min(layer_bits(s, w, cfg.symmetric) for w in widths) for s in shapes.values()) / weights
    most = sum(max(layer_bits(s, w, cfg.symmetric) for w in widths) for s in shapes.values()) / weights
    if cfg.mixed.target_bits < least - 1e-9:
        raise MixedPrecisionError(
            f"quantize.mixed.target_bits {cfg.mixed.target_bits} cannot be met: with the widths "
            f"{[_label(w) for w in widths]} these layers take at least {least:.3f} bits per weight (scales "
            f"included); raise the target to at least {least:.3f} or allow a narrower width")
    if cfg.mixed.target_bits > most:
        log.warning("quantize.mixed.target_bits %.3f is above the widest choice (%.3f bits per weight): every layer "
                    "gets the widest width", cfg.mixed.target_bits, most)


@dataclass
class _Stats:
    fisher: torch.Tensor
    hessian: HessianAccumulator | None = None  # None for a layer that shares another's input


def sensitivity_statistics(model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                           batch_size: int = 8, device: str = "cpu", seed: int = 0,
                           compute_dtype: torch.dtype | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (E[x x^T] of its input, Fisher diagonal of its output)} from one forward/backward pass per batch; with
    `compute_dtype`, the forward pass (and so the backward) multiplies in it (calibration.precision)."""
    stats: dict[str, _Stats] = {}
    last: list = [None, None]  # (input tensor, layer) of the previous call: q/k/v and gate/up read one tensor
    alias: dict[str, str] = {}  # such a layer -> the first of its group, which holds the shared second moment
    handles = []

    def pre_hook(name: str):
        def fn(module, args):
            x = args[0]
            if last[0] is x:
                alias[name] = alias.get(last[1], last[1])
                return
            last[0], last[1] = x, name
            s = stats[name]
            if s.hessian is None:
                s.hessian = HessianAccumulator(x.shape[-1], x.device)
            s.hessian.add(x.detach())
        return fn

    def post_hook(name: str):
        def grad_hook(g: torch.Tensor) -> None:
            stats[name].fisher.add_(g.detach().reshape(-1, g.shape[-1]).float().square().sum(0))

        def fn(module, args, out):
            if out.requires_grad:
                out.register_hook(grad_hook)
        return fn

    for name, module in targets.items():
        stats[name] = _Stats(torch.zeros(module.out_features, device=device))
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    generator = torch.Generator(device=device).manual_seed(seed)
    # Logits, their gradient and the activations kept for the backward pass grow with the batch (8 x 512 tokens
    # of a 49k vocabulary peaked near 10 GB): at most ~2**26 logits (256 MiB in float32) per pass.
    vocab = model.config.vocab_size
    batch_size = max(1, min(batch_size, 2 ** 26 // (windows.shape[1] * vocab)))
    batches = windows.split(batch_size)
    tokens = 0
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # only activation gradients are needed: no weight gradients to compute or keep
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                last[0] = last[1] = None
                with computing_in(device, compute_dtype):
                    logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
                flat = logits.reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(flat, -1), 1, generator=generator).squeeze(1)
                F.cross_entropy(flat, labels, reduction="sum").backward()
                tokens += flat.shape[0]
                del logits, flat
                elapsed = time.perf_counter() - start
                log.info("sensitivity: batch %d/%d, elapsed %.0fs, ETA %.0fs", i + 1, len(batches), elapsed,
                         elapsed / (i + 1) * (len(batches) - i - 1))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    moments = {n: (s.hessian.hessian / 2).cpu() for n, s in stats.items() if n not in alias}  # it holds 2 E[xx^T]
    return {n: (moments[alias.get(n, n)], (s.fisher / tokens).cpu()) for n, s in stats.items()}


def plan_widths(model: nn.Module, targets: dict[str, nn.Linear], cfg: QuantizeConfig, windows: torch.Tensor,
                batch_size: int = 8, device: str = "cpu", compute_dtype: torch.dtype | None = None) -> list[dict]:
    """One row per layer: its chosen (bits, group_size) and the predicted KL at every allowed width."""
    mixed = cfg.mixed
    widths = mixed.widths(cfg.group_size)
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    check_target(shapes, cfg)
    samples = windows if mixed.samples is None else windows[: mixed.samples]
    stats = sensitivity_statistics(model, targets, samples, batch_size, device, compute_dtype=compute_dtype)
    names = list(targets)
    errors, costs = [], []
    start = time.perf_counter()
    for i, name in enumerate(names):
        w = targets[name].weight.detach().float().cpu()
        hessian, fisher = stats.pop(name)
        row_errors = []
        for bits, group in widths:
            q = quantize_rtn(w, bits, group, cfg.symmetric, cfg.clip_search).dequantize()
            row_errors.append(predicted_kl(q - w, hessian, fisher))
        errors.append(row_errors)
        costs.append([layer_bits(shapes[name], wd, cfg.symmetric) for wd in widths])
        if (i + 1) % 50 == 0 or i + 1 == len(names):
            log.info("sensitivity: %d/%d layers scored at %d widths (%.0fs)", i + 1, len(names), len(widths),
                     time.perf_counter() - start)
    budget = mixed.target_bits * sum(o * i for o, i in shapes.values())
    try:
        chosen = allocate(costs, errors, budget)
    except AllocationError as e:
        raise MixedPrecisionError(f"quantize.mixed: {e}") from None
    rows = []
    for name, j, row_errors in zip(names, chosen, errors):
        bits, group = widths[j]
        rows.append({"name": name, "shape": list(shapes[name]), "bits": bits, "group_size": group,
                     "predicted_kl": {_label(w): round(e, 8) for w, e in zip(widths, row_errors)}})
    s = plan_summary(rows, cfg)
    log.info("mixed precision: %.3f bits per weight (target %.3f), predicted KL %.4g; widths: %s",
             s["bits_per_weight"], mixed.target_bits, s["predicted_kl"], s["widths"])
    return rows


def plan_summary(rows: list[dict], cfg: QuantizeConfig) -> dict:
    """What a plan gives: bits per weight reached, layers per width, and the predicted KL summed over layers."""
    counts: dict[str, int] = {}
    for r in rows:
        key = _label((r["bits"], r["group_size"]))
        counts[key] = counts.get(key, 0) + 1
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    spent = sum(layer_bits(tuple(r["shape"]), (r["bits"], r["group_size"]), cfg.symmetric) for r in rows)
    return {"target_bits": cfg.mixed.target_bits, "bits_per_weight": round(spent / weights, 4),
            "widths": dict(sorted(counts.items())),
            "predicted_kl": round(sum(r["predicted_kl"][_label((r["bits"], r["group_size"]))] for r in rows), 6)}


def _label(width: tuple[int, int]) -> str:
    return f"{width[0]}g{width[1]}"
