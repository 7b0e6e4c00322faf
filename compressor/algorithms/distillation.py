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
