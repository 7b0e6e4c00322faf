"""The distill stage: the model as the recipe has left it (student) learns to match the model before the recipe, or
before a given stage (teacher), on calibration or training text.

Weights that are exactly zero when training starts (pruned) are kept at zero after every step, so the sparsity a
pruning stage made survives. A few windows are held out; training stops when their KL has not improved for
`patience` evaluations, and the best weights seen are kept.

With `teacher: precomputed` the teacher runs once, before training, over every window (its blocks streamed to the
device one at a time when it lives elsewhere), and its top-k log-probabilities are the targets: the teacher need not
sit in device memory beside the student and its optimizer, and no window costs a teacher forward twice.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn

from ..algorithms.distillation import hidden_mse, logit_kl, teacher_top_k, top_k_kl
from ..models import decoder_layers
from ..offload import streamed
from ..recipe import DistillConfig
from .base import StageContext, StageReport

log = logging.getLogger(__name__)

WARMUP_SHARE = 0.05  # the warmup's share of the run (of its steps, or of its time budget when that ends it sooner)
WARMUP_CAP = 25  # ... and its steps at most, short enough to finish within any time budget
SPARSE_ENOUGH = 0.01  # weights with at least this fraction of exact zeros keep them (a dense layer has ~none)


def apply_distill(cfg: DistillConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    teacher = ctx.teacher
    if teacher is None:
        raise ValueError("distill needs the teacher model (the run provides the model before the chosen stage)")
    windows = ctx.distill_windows if ctx.distill_windows is not None else ctx.calibration
    if windows is None:
        raise ValueError("distill needs training windows: a calibration section or distill.data")
    if cfg.seq_len is not None and cfg.seq_len < windows.shape[1]:
        pieces = windows.shape[1] // cfg.seq_len  # long windows become several training windows, none is wasted
        windows = windows[:, : pieces * cfg.seq_len].reshape(-1, cfg.seq_len)
    if windows.shape[0] <= cfg.holdout:
        raise ValueError(f"distill: {windows.shape[0]} windows, not more than holdout {cfg.holdout}; give more "
                         "samples (calibration.samples or distill.data.samples) or a smaller holdout")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    held, train = windows[order[: cfg.holdout]], windows[order[cfg.holdout :]]

    params = _trainable(model, cfg)
    masks = {p: p == 0 for p in params if p.dim() == 2 and float((p == 0).float().mean()) >= SPARSE_ENOUGH}
    # fused: one kernel for all tensors, a third of the time of the default on the CPU (~0.1 s a step at 90M weights)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    warmup = max(1, int(min(cfg.steps * WARMUP_SHARE, WARMUP_CAP)))  # a time budget may stop long before cfg.steps
    teacher.eval()
    device = ctx.device
    hidden = cfg.hidden_weight > 0
    held_targets = train_targets = None
    if cfg.teacher == "precomputed":
        held_targets = _top_k_targets(teacher, held, cfg, device, temperature=1.0, hidden=False)
        train_targets = _top_k_targets(teacher, train, cfg, device, cfg.temperature, hidden)

    def held_kl() -> float:
        total = 0.0
        with torch.no_grad():
            for rows in torch.arange(len(held)).split(cfg.batch_size):
                batch = held[rows].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                if held_targets is None:
                    kl = logit_kl(logits, teacher(input_ids=batch, use_cache=False).logits)
                else:
                    kl = top_k_kl(logits, *_rows(held_targets, rows, device)[:3])
                total += float(kl) * len(batch)
        return total / len(held)

    def train_loss(rows: torch.Tensor) -> torch.Tensor:
        batch = train[rows].to(device)
        with _autocast(device, cfg.precision):
            s_out = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
        if train_targets is None:
            with torch.no_grad(), _autocast(device, cfg.precision):
                t_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=hidden)
            loss = logit_kl(s_out.logits, t_out.logits, cfg.temperature)
            t_hidden = t_out.hidden_states[-1] if hidden else None
        else:
            top, ids, rest, *t_hidden_ = _rows(train_targets, rows, device)
            loss = top_k_kl(s_out.logits, top, ids, rest, cfg.temperature)
            t_hidden = t_hidden_[0] if hidden else None
        if hidden:
            loss = loss + cfg.hidden_weight * hidden_mse(s_out.hidden_states[-1], t_hidden)
        return loss

    model.eval()
    first = best = held_kl()
    best_step, best_state, waited = 0, _snapshot(params), 0
    rows = [{"step": 0, "train_loss": None, "holdout_kl": round(first, 6)}]
    log.info("distill: %d trainable tensors (%.1fM weights), %d train / %d held-out windows, held-out KL %.4f",
             len(params), sum(p.numel() for p in params) / 1e6, len(train), len(held), first)
    running, seen, step = 0.0, 0, 0
    train_start = time.perf_counter()  # the schedule spreads over the budget that is left for training
    for step in range(1, cfg.steps + 1):
        model.train()
        budget_used = 0.0 if cfg.max_minutes is None else (
            (time.perf_counter() - train_start) / max(1e-9, cfg.max_minutes * 60 - (train_start - start)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * learning_rate_factor(cfg.schedule, step, warmup, max((step - 1) / cfg.steps,
                                                                                         budget_used))
        loss = train_loss(torch.randint(0, len(train), (cfg.batch_size,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        with torch.no_grad():
            for p, zero in masks.items():
                p.masked_fill_(zero, 0)
        running += float(loss.detach())
        seen += 1
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start >= cfg.max_minutes * 60
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            model.eval()
            kl = held_kl()
            lr = opt.param_groups[0]["lr"]
            rows.append({"step": step, "train_loss": round(running / seen, 6), "holdout_kl": round(kl, 6),
                         "lr": lr})
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (cfg.steps - step)
            if cfg.max_minutes is not None:
                eta = min(eta, max(0.0, cfg.max_minutes * 60 - elapsed))
            log.info("distill: step %d/%d, lr %.2e, train loss %.4f, held-out KL %.4f (best %.4f), elapsed %.0fs, "
                     "ETA %.0fs", step, cfg.steps, lr, running / seen, kl, min(best, kl), elapsed, eta)
            running, seen = 0.0, 0
            if kl < best:
                best, best_step, best_state, waited = kl, step, _snapshot(params), 0
            else:
                waited += 1
                if waited >= cfg.patience:
                    log.info("distill: no improvement in %d evaluations; stopping at step %d", waited, step)
                    break
            if out_of_time:
                log.info("distill: the %.1f-minute budget is spent; stopping at step %d", cfg.max_minutes, step)
                break
    _restore(params, best_state)
    model.eval()
    summary = {"steps": step, "teacher": cfg.teacher, "precision": cfg.precision, "warmup_steps": warmup,
               "schedule": cfg.schedule,
               "train_windows": len(train), "best_step": best_step, "holdout_kl_before": round(first, 6),
               "holdout_kl_after": round(best, 6), "recovered": round(1 - best / first, 4) if first > 0 else None,
               "trainable_weights": sum(p.numel() for p in params), "sparse_tensors_kept": len(masks)}
    if not math.isfinite(best):
        raise ValueError("distill: the held-out KL is not finite; lower distill.lr")
    return StageReport("distill", seconds=time.perf_counter() - start, summary=summary, layers=rows)


def learning_rate_factor(schedule: str, step: int, warmup: int, progress: float) -> float:
    """The share of the peak learning rate at `step` (from 1): a linear warmup over `warmup` steps or the first 5% of
    the run, whichever ends first, then `schedule` over `progress`, the fraction of the run done (of its steps or of
    its time budget, whichever is further along). Decaying to zero matters with a short budget: the last steps
    average out the noise of the earlier ones."""
    progress = min(1.0, max(0.0, progress))
    if step < warmup and progress < WARMUP_SHARE:
        return max(step / warmup, progress / WARMUP_SHARE)
    if schedule == "constant":
        return 1.0
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The training passes' precision. The loss reads the logits row by row in float32 whatever their dtype."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, precision))


def _top_k_targets(teacher: nn.Module, windows: torch.Tensor, cfg: DistillConfig, device: str, temperature: float,
                   hidden: bool) -> list[torch.Tensor]:
    """[top log-probabilities, their token ids, log of the rest's probability(, final hidden state)] for each window,
    kept on the CPU (ids as int32, hidden states as float16, to bound memory)."""
    start = time.perf_counter()
    parts: list[list[torch.Tensor]] = [[], [], []] + ([[]] if hidden else [])
    batches = windows.split(cfg.batch_size)
    with torch.no_grad(), streamed(teacher, device):
        for i, batch in enumerate(batches, 1):
            out = teacher(input_ids=batch.to(device), use_cache=False, output_hidden_states=hidden)
            top, ids, rest = teacher_top_k(out.logits, cfg.top_k, temperature)
            found = [top, ids.to(torch.int32), rest] + ([out.hidden_states[-1].half()] if hidden else [])
            for part, t in zip(parts, found):
                part.append(t.cpu())
            if i % 10 == 0 or i == len(batches):
                elapsed = time.perf_counter() - start
                log.info("distill: teacher targets, batch %d/%d, elapsed %.0fs, ETA %.0fs", i, len(batches), elapsed,
                         elapsed / i * (len(batches) - i))
    return [torch.cat(p) for p in parts]


def _rows(targets: list[torch.Tensor], rows: torch.Tensor, device: str) -> list[torch.Tensor]:
    top, ids, rest, *hidden = (t[rows].to(device) for t in targets)
    return [top, ids.long(), rest] + [h.float() for h in hidden]


def _trainable(model: nn.Module, cfg: DistillConfig) -> list[nn.Parameter]:
    scope = decoder_layers(model) if cfg.train == "blocks" else model
    params = [p for p in scope.parameters() if p.dtype.is_floating_point]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in params]


def _restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
    for p in params:
        p.requires_grad_(False)
