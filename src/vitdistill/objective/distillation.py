"""Supervision from a teacher's class predictions (DeiT, Touvron et al. 2021).

Route these to the distillation head (``head: dist``, the default when the model has one) and
``ce`` to the class head for DeiT's distillation token; route both to ``cls`` for the
class-token-only variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Term, register_term


def kl_teacher_student(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, tau: float, normalization: str) -> torch.Tensor:
    """``tau^2 * KL(psi(Z_t/tau) || psi(Z_s/tau))``, in fp32.

    ``normalization='batchmean'``: the sum over classes, averaged over the batch -- the true KL
    of each sample, on the same scale as cross-entropy, so the weight lambda means what it says.
    ``normalization='deit'``: DeiT's reference divides the sum by batch x classes, which makes
    the term C times smaller (1000x on ImageNet); use it only to reproduce DeiT's numbers.
    """
    log_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_t = teacher_log_probs.float()
    kl_sum = (log_t.exp() * (log_t - log_s)).sum()
    denominator = log_s.shape[0] * (log_s.shape[1] if normalization == "deit" else 1)
    return kl_sum * (tau * tau) / denominator


@register_term
class SoftDistillation(Term):
    """Soft distillation: ``L = tau^2 * KL(psi(Z_t/tau) || psi(Z_s/tau))``.

    With ``ce`` at weight ``1 - lambda`` and this term at weight ``lambda`` the objective is
    DeiT's ``(1-lambda) CE(psi(Z_s), y) + lambda tau^2 KL(psi(Z_s/tau), psi(Z_t/tau))``.
    """

    name = "kd_soft"
    needs_teacher = True

    @dataclass
    class Params:
        tau: float = 1.0
        normalization: Literal["batchmean", "deit"] = "batchmean"

        def validate(self, key: str) -> None:
            if self.tau <= 0:
                raise ConfigError(f"{key}.tau", "must be positive")

    @classmethod
    def default_head(cls, has_dist_head: bool) -> str:
        return "dist" if has_dist_head else "cls"

    def forward(self, out, batch, teacher):
        p = self.params
        return kl_teacher_student(out.head(self.head), teacher.log_probs(p.tau), p.tau, p.normalization)


@register_term
class HardDistillation(Term):
    """Hard-label distillation: ``L = CE(psi(Z_s), y_t)`` with ``y_t = argmax Z_t``.

    Optional label smoothing on the teacher label: target ``(1 - eps) onehot(y_t) + eps / C``.
    With ``ce`` (weight 1/2) this is DeiT's ``1/2 CE(psi(Z_s), y) + 1/2 CE(psi(Z_s), y_t)``.
    """

    name = "kd_hard"
    needs_teacher = True

    @dataclass
    class Params:
        smoothing: float = 0.0  # eps on the teacher label

    @classmethod
    def default_head(cls, has_dist_head: bool) -> str:
        return "dist" if has_dist_head else "cls"

    def forward(self, out, batch, teacher):
        logits = out.head(self.head).float()
        return F.cross_entropy(logits, teacher.hard_labels(), label_smoothing=self.params.smoothing)
