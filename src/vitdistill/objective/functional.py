"""Loss functions shared by several terms (each term's module keeps its own equation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean  -sum_c target_c * log psi(Z)_c``, in fp32: the sum over the last (class) axis,
    the mean over every other (samples ``[B, C]``, or samples and tokens ``[B, N, C]``)."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
