"""Feature distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation"): the student learns to reproduce the teacher's whitened
feature map, token by token. Any backbone can teach (a CNN, or a ViT trained on other classes,
self-supervised or CLIP-like): the teacher's head is never read.

Typical use (stage 1 of a two-stage recipe, label-free; stage 2 fine-tunes on the labels)::

    teacher: {checkpoint: runs/cnn_teacher_cifar10, feature_layer: -1}
    objective:
      - {term: feature, beta: 2.0}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UserError
from ..rng import derive_seed
from ..targets import TeacherSource
from .base import Term, register_term

WHITEN_EPS = 1e-6


def whiten(tokens: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """``W(t)_i = (t_i - mu_i) / sqrt(sigma_i^2 + eps)`` per token ``i`` of ``[B, N, C]``, with
    ``mu_i``, ``sigma_i^2`` the mean and (biased) variance over the C channels: a LayerNorm over
    channels without affine parameters (the paper's whitening), in fp32."""
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)


def adapt_grid(features: torch.Tensor, grid: tuple[int, int], mode: str = "interpolate") -> torch.Tensor:
    """The teacher's map ``[B, C, H, W]`` on the student's token grid, as tokens ``[B, h*w, C]``
    in raster order (the order of a ViT's patch tokens).

    Equal grids pass unchanged. Otherwise ``interpolate``: bilinear (``align_corners=False``;
    antialiased, i.e. averaged over each token's footprint, when shrinking); ``pool``: adaptive
    average pooling (each student token averages the teacher cells it overlaps; when the
    teacher's grid is smaller, each cell is repeated)."""
    h, w = grid
    if tuple(features.shape[-2:]) != (h, w):
        if mode == "interpolate":
            shrink = features.shape[-2] > h or features.shape[-1] > w
            features = F.interpolate(features.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
        elif mode == "pool":
            features = F.adaptive_avg_pool2d(features.float(), (h, w))
        else:
            raise ValueError(f"unknown grid mode {mode!r}")
    return features.flatten(2).transpose(1, 2)


@register_term
class Feature(Term):
    """Feature distillation: smooth-L1 between projected student tokens and whitened teacher tokens.

    ``L = mean_b 1/(N C) sum_i sum_c smoothL1_beta( P(h_i)_c - W(t_i)_c )``

    - ``h_i``: the student's final patch tokens after its final norm (``out.final_tokens``: timm's
      ``norm``, or ``fc_norm`` in average-pooled models such as BEiT, where timm normalises only
      after pooling; the Feature-Distillation reference projects the normalised tokens), ``N``
      of them; with ``class_token`` also the class token ``h_0``, against the teacher's
      ``t_0``, and the sum runs over ``N + 1`` tokens (the reference supervises all of them);
    - ``P``: the projector, a per-token linear map ``D_s -> C`` (a 1x1 convolution), an objective
      parameter: trained with the student, saved in ``checkpoint.pt``, never exported;
    - ``t_i``: the teacher's feature map of ``teacher.feature_layer`` (``[B, C, H, W]``; a ViT
      teacher's patch tokens on their grid, after its final norm unless ``teacher.feature_norm``
      is false) moved to the student's grid (:func:`adapt_grid`, ``grid``), ``W`` the whitening
      (:func:`whiten`, ``eps``; the reference's ``nn.LayerNorm`` default is 1e-5);
    - ``smoothL1_beta(d) = d^2 / (2 beta)`` if ``|d| < beta``, else ``|d| - beta / 2`` (the paper:
      ``beta = 2``).
    """

    name = "feature"
    needs_teacher = True
    needs_teacher_features = True
    uses_head = False

    @dataclass
    class Params:
        beta: float = 2.0
        grid: Literal["interpolate", "pool"] = "interpolate"  # how the teacher's map meets the student's grid
        class_token: bool = False  # also the student's class token against the teacher's (both ViTs with one)
        eps: float = WHITEN_EPS  # the whitening's epsilon

        def validate(self, key: str) -> None:
            if self.beta <= 0:
                raise ConfigError(f"{key}.beta", "must be positive")
            if self.eps <= 0:
                raise ConfigError(f"{key}.eps", "must be positive")

    def setup(self, model, seed: int, teacher: TeacherSource | None = None) -> None:
        self.grid = model.token_grid
        if self.grid is None:
            raise UserError(f"feature: the student must be a vision transformer with a patch grid; {model.spec.name} has none")
        if teacher is None or "features" not in teacher.gives:
            raise UserError(
                "feature: the teacher gives no feature maps (a store or label maps hold class predictions); use teacher.checkpoint or teacher.name"
            )
        if model.spec.input_size is None:
            raise UserError("feature: the student's input size is unknown")
        if self.params.class_token:
            if getattr(model.backbone, "cls_token", None) is None:
                raise UserError(f"feature.class_token: the student {model.spec.name} has no class token")
            if not teacher.has_class_token:
                raise UserError("feature.class_token: the teacher has no class token (a CNN, or a ViT without one); set class_token: false")
        channels = teacher.feature_shape(model.spec.input_size)[0]
        width = model.backbone.num_features
        # the projector's initial weights depend on the run seed only, not on what was built before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "projector"))
            self.projector = nn.Linear(width, channels)

    def forward(self, out, batch, teacher):
        target = adapt_grid(teacher.feature_map(), self.grid, self.params.grid)
        tokens = out.final_tokens
        prefix = out.num_prefix
        if tokens.shape[1] - prefix != target.shape[1]:
            raise UserError(
                f"feature: the student gives {tokens.shape[1] - prefix} patch tokens, its grid {self.grid} has {target.shape[1]}"
            )
        if self.params.class_token:  # the class token is the first prefix token in timm's ViTs
            target = torch.cat([teacher.feature_class_token()[:, None].to(target.dtype), target], dim=1)
            tokens = torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1)
        else:
            tokens = tokens[:, prefix:]
        target = whiten(target, self.params.eps)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            projected = self.projector(tokens.float())
        return F.smooth_l1_loss(projected, target, beta=self.params.beta)
