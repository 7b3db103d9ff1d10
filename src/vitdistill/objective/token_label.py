"""Token labeling (Jiang et al. 2021, LV-ViT): every patch token learns the teacher's label of
its own region; MixToken mixes two images' tokens right after patch embedding."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, RecipeWarning, UserError
from ..models.output import TokenMix
from ..rng import CounterRNG, derive_seed
from .base import Term, register_term
from .functional import soft_cross_entropy


def sample_token_mix(rng: CounterRNG, epoch: int, index: torch.Tensor, grid: tuple[int, int], box: str = "sample") -> TokenMix:
    """CutMix boxes on the token grid (``lam ~ U(0, 1)``, side ``sqrt(1 - lam)`` of the grid,
    uniform centre, clipped, as LV-ViT's ``rand_bbox``); the partner is the sample at the mirrored
    batch position (LV-ViT's ``x.flip(0)``).

    ``box="sample"``: one box per sample, drawn from ``(seed, epoch, index)``. ``box="batch"``: one
    box for the whole batch, as the reference (one ``np.random`` draw per forward), drawn from
    ``(seed, epoch, key)`` where ``key`` hashes the batch's sample indices (order-free), so the same
    batch gets the same box on replay, on any device."""
    gh, gw = grid
    if box == "batch":
        key = (rng.bits(epoch, index, "mixtoken.batch", 1).sum() & 0xFFFFFFFF).reshape(1)
        u = rng.uniform(epoch, key, "mixtoken.box", 3).expand(index.shape[0], 3)
    else:
        u = rng.uniform(epoch, index, "mixtoken", 3)
    cut = torch.sqrt(1.0 - u[:, 0])
    cut_h, cut_w = torch.floor(gh * cut), torch.floor(gw * cut)
    cy, cx = torch.floor(u[:, 1] * gh), torch.floor(u[:, 2] * gw)
    y1, y2 = (cy - cut_h // 2).clamp(0, gh), (cy + cut_h // 2).clamp(0, gh)
    x1, x2 = (cx - cut_w // 2).clamp(0, gw), (cx + cut_w // 2).clamp(0, gw)
    rows = torch.arange(gh, device=index.device)[None, :]
    cols = torch.arange(gw, device=index.device)[None, :]
    inside = ((rows >= y1[:, None]) & (rows < y2[:, None]))[:, :, None] & ((cols >= x1[:, None]) & (cols < x2[:, None]))[:, None, :]
    return TokenMix(mask=inside.flatten(1), partner=torch.arange(index.shape[0] - 1, -1, -1, device=index.device))


@register_term
class TokenLabel(Term):
    """Token labeling: ``L = H(X_cls, y_cls) + beta * (1/N) sum_i H(X_i, y_i)``.

    ``X_cls``: the routed class head; ``X_i``: the per-token head on patch token ``i``; ``y_i``:
    the teacher's label map pooled over token ``i``'s region of the crop (``teacher.label_maps``).
    ``y_cls`` (``cls_target``): ``label`` the ground truth (as ``ce``, mixed by mixup/cutmix,
    ``smoothing``), ``teacher`` the label map pooled over the whole crop, or ``mix``
    ``(1 - cls_mix) * label + cls_mix * teacher``.

    ``mixtoken``: inside a box on the token grid the tokens come from the partner image (the
    mirrored batch position); token targets are mixed with the same mask, ``y_cls`` by the mask's
    mean. ``mixtoken_box``: ``sample`` (default) draws one box per sample, ``batch`` one box for the
    whole batch as LV-ViT's reference code does (:func:`sample_token_mix`). Use it as the
    objective's only label term (other terms would see mixed tokens with unmixed targets).
    """

    name = "token_label"
    needs_teacher = True
    needs_token_logits = True

    @dataclass
    class Params:
        beta: float = 0.5
        cls_target: Literal["label", "teacher", "mix"] = "label"
        cls_mix: float = 0.5
        smoothing: float = 0.0
        mixtoken: bool = False
        mixtoken_box: Literal["sample", "batch"] = "sample"  # one MixToken box per sample, or per batch (the reference's)

        def validate(self, key: str) -> None:
            if self.beta < 0:
                raise ConfigError(f"{key}.beta", "must be >= 0")
            if not 0 <= self.cls_mix <= 1:
                raise ConfigError(f"{key}.cls_mix", "must be in [0, 1]")
            if self.mixtoken_box != "sample" and not self.mixtoken:
                warnings.warn(f"{key}.mixtoken_box has no effect with {key}.mixtoken=false", RecipeWarning, stacklevel=2)

    def setup(self, model, seed: int, teacher=None) -> None:
        self.grid = model.token_grid
        if self.grid is None:
            raise UserError(f"token_label needs a vision transformer with a patch grid; {model.spec.name} has none")
        self.rng = CounterRNG(derive_seed(seed, "mixtoken"))

    def model_inputs(self, batch) -> dict:
        if not (self.params.mixtoken and self.training):
            return {}
        return {"token_mix": sample_token_mix(self.rng, batch.epoch, batch.view, self.grid, self.params.mixtoken_box)}

    def class_target(self, batch, teacher) -> torch.Tensor:
        p = self.params
        if p.cls_target == "teacher":
            return teacher.probs.float()
        label = batch.label_targets(self.num_classes, p.smoothing)
        return label if p.cls_target == "label" else (1 - p.cls_mix) * label + p.cls_mix * teacher.probs.float()

    def forward(self, out, batch, teacher):
        tokens = teacher.tokens().float()  # [B, N, C]
        y_cls = self.class_target(batch, teacher)
        if out.token_mix is not None:
            mix = out.token_mix
            tokens = torch.where(mix.mask[..., None], tokens[mix.partner], tokens)
            share = mix.mask.float().mean(dim=1, keepdim=True)
            y_cls = (1 - share) * y_cls + share * y_cls[mix.partner]
        if out.token_logits is None or out.token_logits.shape[1] != tokens.shape[1]:
            raise UserError("token_label: the model's per-token logits do not match the token targets' grid")
        token_loss = soft_cross_entropy(out.token_logits, tokens)
        return soft_cross_entropy(out.head(self.head), y_cls) + self.params.beta * token_loss
