"""Supervision from the labels."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Term, register_term
from .functional import soft_cross_entropy


@register_term
class CrossEntropy(Term):
    """Cross-entropy with the label (mixed by mixup/cutmix, optionally smoothed).

    ``L_ce = mean_b H(y_b, psi(Z_s,b))`` with
    ``y_b = lam_b * smooth(onehot(label_b)) + (1 - lam_b) * smooth(onehot(label_partner_b))``
    and ``smooth(y) = (1 - eps) * y + eps / C``.
    """

    name = "ce"

    @dataclass
    class Params:
        smoothing: float = 0.0  # eps, label smoothing

    def forward(self, out, batch, teacher):
        target = batch.label_targets(self.num_classes, self.params.smoothing)
        return soft_cross_entropy(out.head(self.head), target)
