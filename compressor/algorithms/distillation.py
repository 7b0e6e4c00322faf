"""Knowledge-distillation losses over logits and hidden states."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens, of the distributions softened by `temperature`, scaled
    by T² so that gradients keep their size across temperatures (Hinton et al., 2015)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    with torch.no_grad():
        p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s.reshape(-1, s.shape[-1]), p.reshape(-1, p.shape[-1]), log_target=True, reduction="batchmean")
    return kl * t * t


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
