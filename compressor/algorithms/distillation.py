"""Knowledge-distillation losses over logits and hidden states."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens, of the distributions softened by `temperature`, scaled
    by T² so that gradients keep their size across temperatures (Hinton et al., 2015). Only the student's logits
    get a gradient."""
    return _LogitKL.apply(student_logits, teacher_logits.detach(), float(temperature))


class _LogitKL(torch.autograd.Function):
    """The KL of `logit_kl` in two passes over the [tokens, vocabulary] logits instead of a dozen: with p the
    teacher's softened distribution and z = student logits / T, KL = Σ p·(t/T - z) + lse(z) - lse(t/T), and its
    gradient in z is softmax(z) - p. Rows go a few at a time so that the temporaries stay in cache: at a 50k
    vocabulary the textbook formula took a fifth of a distillation step on the CPU."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = student.shape[-1]
        z_all, t_all = student.detach().reshape(-1, vocab), teacher.reshape(-1, vocab)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for rows in _row_chunks(z_all.shape[0], vocab):
            z, t = z_all[rows].float() / temperature, t_all[rows].float() / temperature
            p, lse_t = torch.softmax(t, dim=-1), torch.logsumexp(t, dim=-1)
            cross = torch.bmm(p.unsqueeze(1), t.sub_(z).unsqueeze(2))  # Σ p·(t - z), t overwritten
            total += (cross.reshape(-1) + torch.logsumexp(z, dim=-1) - lse_t).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return total / z_all.shape[0] * temperature * temperature

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        vocab, temperature = student.shape[-1], ctx.temperature
        z_all, t_all = student.detach().reshape(-1, vocab), teacher.reshape(-1, vocab)
        out = torch.empty_like(z_all)
        scale = grad * temperature / z_all.shape[0]  # d(z)/d(logits) = 1/T, times the T² and the mean
        for rows in _row_chunks(z_all.shape[0], vocab):
            q = torch.softmax(z_all[rows].float() / temperature, dim=-1)
            q.sub_(torch.softmax(t_all[rows].float() / temperature, dim=-1)).mul_(scale)
            out[rows] = q
        return out.reshape(student.shape), None, None


def _row_chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, (1 << 20) // vocab)  # ~4 MB of float32 per temporary
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states relative to the teacher's mean square (scale-free across models)."""
    teacher_hidden = teacher_hidden.float().detach()
    return (student_hidden.float() - teacher_hidden).square().mean() / teacher_hidden.square().mean().clamp(min=1e-12)


# Fill for the log-probabilities of tokens left out of a bucket: finite (not -inf) so that a bucket holding nothing
# has a zero probability and finite gradients.
_OUTSIDE = -1e4


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's distribution softened by `temperature`, kept as its `k` most likely tokens per position: their
    log-probabilities and ids [..., k], and the log of the probability all other tokens share [...]."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top, ids, _log_rest(logp, ids)


def top_k_kl(student_logits: torch.Tensor, top: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens and scaled by T², between the two distributions reduced
    to the teacher's top-k tokens plus one bucket for all the others (targets from `teacher_top_k`).

    The reduction merges tokens, so this is a lower bound of the full KL, equal to it when k covers the vocabulary;
    with the usual k (tens of tokens) the bucket holds little of the teacher's mass."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    s_top, s_rest = s.gather(-1, ids), _log_rest(s, ids)
    kl = (top.exp() * (top - s_top)).sum(-1) + rest.exp() * (rest - s_rest)
    return kl.mean() * t * t


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logp.scatter(-1, ids, _OUTSIDE).logsumexp(-1)
