"""Perplexity, KL divergence and top-1 agreement of candidates against a baseline, on the same token windows.

The baseline and every candidate run window by window in lockstep, so the baseline's full next-token
distributions never need to be stored.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class LogitsRuntime(Protocol):
    """Anything that maps token ids [batch, seq] to next-token logits [batch, seq, vocab]."""

    name: str

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    window_nll: list[float] = field(default_factory=list)

    def result(self, with_baseline: bool) -> dict[str, float]:
        out = {"perplexity": math.exp(self.nll / self.tokens), "tokens": self.tokens}
        if with_baseline:
            out["kl_divergence"] = self.kl / self.tokens
            out["top1_agreement"] = self.agree / self.tokens
        return out


def compare(baseline: LogitsRuntime, candidates: list[LogitsRuntime], windows: torch.Tensor,
            batch_size: int = 1) -> dict[str, dict[str, float]]:
    """Metrics per runtime name; the baseline gets its perplexity, candidates also KL(baseline‖candidate) and
    top-1 agreement, averaged over all predicted tokens (every position but the last of each window)."""
    sums = {rt.name: _Sums() for rt in [baseline, *candidates]}
    start = time.perf_counter()
    batches = windows.split(batch_size)
    for i, batch in enumerate(batches):
        targets = batch[:, 1:]
        base_lp = torch.log_softmax(baseline.logits(batch)[:, :-1].float(), dim=-1)
        _add_nll(sums[baseline.name], base_lp, targets)
        base_p = base_lp.exp()
        base_top = base_lp.argmax(-1)
        for rt in candidates:
            lp = torch.log_softmax(rt.logits(batch)[:, :-1].float(), dim=-1)
            s = sums[rt.name]
            _add_nll(s, lp, targets)
            s.kl += float((base_p * (base_lp - lp)).sum(-1).sum())
            s.agree += int((lp.argmax(-1) == base_top).sum())
            del lp
        elapsed = time.perf_counter() - start
        log.info("evaluate: window batch %d/%d, elapsed %.0fs, ETA %.0fs", i + 1, len(batches), elapsed,
                 elapsed / (i + 1) * (len(batches) - i - 1))
    return {name: s.result(name != baseline.name) for name, s in sums.items()}


def _add_nll(s: _Sums, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    s.nll += float(nll.sum())
    s.tokens += targets.numel()


class TorchRuntime:
    """A transformers model in PyTorch."""

    def __init__(self, name: str, model: torch.nn.Module, device: str = "cpu") -> None:
        self.name, self.model, self.device = name, model, device

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()
