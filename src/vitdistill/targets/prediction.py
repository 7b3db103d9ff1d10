"""What a teacher says about a batch of views, whichever way it was obtained."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError


@dataclass
class TeacherPrediction:
    """A teacher's answer for each view: raw logits (online teacher) or a dense probability
    distribution at a fixed temperature (an offline store), and per token (label maps) the
    distribution of each token's region, and (online teachers) the feature map of a chosen
    stage or block. Terms ask for what they need and get a clear error when the source cannot
    provide it (e.g. a new temperature from stored probabilities)."""

    logits: torch.Tensor | None = None  # [B, C]
    probs: torch.Tensor | None = None  # [B, C] at `temperature`
    temperature: float = 1.0
    token_probs: torch.Tensor | None = None  # [B, N, C]: each student token's region
    top1: torch.Tensor | None = None  # [B] the teacher's class when known exactly (stores: fp16 can tie)
    features: torch.Tensor | None = None  # [B, C, H, W] feature map (teacher.feature_layer), fp32
    feature_cls: torch.Tensor | None = None  # [B, C] a ViT teacher's class token at that block, fp32

    def feature_map(self) -> torch.Tensor:
        """``[B, C, H, W]`` the teacher's feature map (a ViT's patch tokens on their grid)."""
        if self.features is None:
            raise UserError("the objective needs the teacher's feature maps: use an online teacher (teacher.checkpoint or teacher.name)")
        return self.features

    def feature_class_token(self) -> torch.Tensor:
        """``[B, C]`` the teacher's class token at the feature map's block (ViT teachers)."""
        if self.feature_cls is None:
            raise UserError(
                "the objective needs the teacher's class token: use a ViT teacher with one (or set the term's class_token: false)"
            )
        return self.feature_cls

    def tokens(self) -> torch.Tensor:
        """``[B, N, C]`` per-token target distributions."""
        if self.token_probs is None:
            raise UserError("the objective needs per-token targets: give the teacher's label maps (teacher.label_maps)")
        return self.token_probs

    def log_probs(self, tau: float = 1.0) -> torch.Tensor:
        """``log psi(Z_t / tau)`` in fp32."""
        if self.logits is not None:
            return F.log_softmax(self.logits.float() / tau, dim=-1)
        assert self.probs is not None
        if abs(tau - self.temperature) > 1e-6:
            raise UserError(f"the teacher's targets are stored at temperature {self.temperature}; a term asks for {tau}")
        return torch.log(self.probs.float().clamp_min(1e-12))

    def hard_labels(self) -> torch.Tensor:
        """``y_t = argmax Z_t``."""
        if self.top1 is not None:
            return self.top1
        source = self.logits if self.logits is not None else self.probs
        assert source is not None
        return source.argmax(dim=-1)
