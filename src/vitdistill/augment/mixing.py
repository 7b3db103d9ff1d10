"""Mixup and CutMix with replayable partners and per-sample lambda.

Sample ``i``'s partner is its successor in the epoch's seeded cycle (a permutation read as a
cycle, so nobody is its own partner); the partner's pixels are the partner's own augmented view.
Everything is a function of ``(seed, epoch, index)``: a mixed view can be rebuilt from its index
alone, on any batch. timm's ``Mixup`` instead mixes with the reversed batch (so the result
depends on batch composition) and needs an even batch; we cannot use it for replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AugmentConfig
from ..errors import UserError
from ..rng import CounterRNG


@dataclass
class MixPlan:
    """Per sample: the partner index, own share ``lam`` of the label, and the cutmix box.

    ``box`` is ``(x1, y1, x2, y2)`` in output pixels: inside it the image shows the partner.
    It is empty for mixup and unmixed samples; ``is_cutmix`` tells the two apart.
    """

    partner: torch.Tensor  # [B] int64
    lam: torch.Tensor  # [B] float32, 1.0 when unmixed
    box: torch.Tensor  # [B, 4] float32
    is_cutmix: torch.Tensor  # [B] bool
    is_mixed: torch.Tensor  # [B] bool


def partner_table(rng: CounterRNG, epoch: int, n: int) -> torch.Tensor:
    """``partner[i]`` for every index of the split, for this epoch."""
    cycle = rng.permutation(epoch, n, "mix-partner")
    partner = torch.empty_like(cycle)
    partner[cycle] = torch.roll(cycle, -1)
    return partner


def mixing_enabled(cfg: AugmentConfig) -> bool:
    return cfg.mix_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


def plan_mixing(rng: CounterRNG, epoch: int, index: torch.Tensor, partners: torch.Tensor, cfg: AugmentConfig, size: int) -> MixPlan:
    """Decide per sample whether and how to mix (``partners`` from :func:`partner_table`)."""
    n = index.shape[0]
    u = rng.uniform(epoch, index, "mix", 4)
    mixed = u[:, 0] < cfg.mix_prob
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        cutmix = u[:, 1] < cfg.switch_prob
    else:
        cutmix = torch.full((n,), cfg.cutmix_alpha > 0, device=index.device)
    lam = torch.ones(n, device=index.device)
    if cfg.mixup_alpha > 0:
        lam = torch.where(cutmix, lam, rng.beta(epoch, index, "mixup-lam", cfg.mixup_alpha))
    box = torch.zeros(n, 4, device=index.device)
    if cfg.cutmix_alpha > 0:
        lam_cut = rng.beta(epoch, index, "cutmix-lam", cfg.cutmix_alpha)
        # timm's rand_bbox: a square-ish box of side sqrt(1 - lam) around a uniform centre,
        # clipped to the image; lam is then corrected to the visible area. (sqrt in float64:
        # a last-bit difference between eager and compiled code then cannot flip the floor.)
        cut = torch.floor(size * torch.sqrt(1.0 - lam_cut.to(torch.float64))).to(torch.float32)
        cy, cx = torch.floor(u[:, 2] * size), torch.floor(u[:, 3] * size)
        y1, y2 = (cy - cut // 2).clamp(0, size), (cy + cut // 2).clamp(0, size)
        x1, x2 = (cx - cut // 2).clamp(0, size), (cx + cut // 2).clamp(0, size)
        cut_box = torch.stack([x1, y1, x2, y2], dim=1)
        lam_corrected = 1.0 - (x2 - x1) * (y2 - y1) / float(size * size)
        box = torch.where((cutmix & mixed)[:, None], cut_box, box)
        lam = torch.where(cutmix, lam_corrected, lam)
    lam = torch.where(mixed, lam, torch.ones_like(lam))
    partner = torch.where(mixed, partners[index.to(partners.device)].to(index.device), index)
    return MixPlan(partner=partner, lam=lam, box=box, is_cutmix=cutmix & mixed, is_mixed=mixed)


def box_mask(box: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """``[B, height, width]`` bool: True where the pixel centre is inside the sample's box."""
    ys = torch.arange(height, device=box.device, dtype=box.dtype) + 0.5
    xs = torch.arange(width or height, device=box.device, dtype=box.dtype) + 0.5
    inside_y = (ys[None, :] > box[:, 1:2]) & (ys[None, :] < box[:, 3:4])
    inside_x = (xs[None, :] > box[:, 0:1]) & (xs[None, :] < box[:, 2:3])
    return inside_y[:, :, None] & inside_x[:, None, :]


def apply_mixing(own: torch.Tensor, partner: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Mix ``[B, C, H, W]`` views: a blend for mixup, the partner inside the box for cutmix."""
    lam = plan.lam.view(-1, 1, 1, 1).to(own.dtype)
    blended = lam * own + (1.0 - lam) * partner
    blended = torch.where(plan.is_cutmix.view(-1, 1, 1, 1), own, blended)
    inside = box_mask(plan.box, own.shape[-1])[:, None]
    return torch.where(inside, partner, blended)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``[B, C]`` label distributions ``(1 - eps) onehot(y) + eps / C`` (label smoothing ``eps``), fp32."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def token_own_share(mix_boxes: torch.Tensor, lam: torch.Tensor, image_size, num_tokens: int) -> torch.Tensor:
    """``[B, N]``: the share of token ``i``'s pixels that come from the sample's own image.

    CutMix samples (a non-empty ``mix_boxes``): 0 for tokens whose centre lies inside the box
    (they show the partner), 1 for the others. Mixup and unmixed samples: ``lam`` for every
    token (1 when unmixed). The ``g x g`` token grid (``g = sqrt(N)``) tiles the ``S x S`` view,
    so token ``(r, c)`` (raster index ``r g + c``) has its centre at ``((c + 1/2) p, (r + 1/2) p)``
    with ``p = S / g``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    side = round(num_tokens**0.5)
    if height != width or side * side != num_tokens:
        raise UserError(f"token targets need a square image on a square token grid, got {height}x{width} pixels and {num_tokens} tokens")
    box = mix_boxes.float()
    patch = height / side
    x1, y1, x2, y2 = (box[:, k, None] / patch for k in range(4))  # in token units, [B, 1]
    centres = torch.arange(side, device=box.device, dtype=box.dtype) + 0.5
    inside_y = (centres > y1) & (centres < y2)  # [B, g] rows
    inside_x = (centres > x1) & (centres < x2)  # [B, g] columns
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)  # [B, N] raster order
    is_cutmix = ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))[:, None]
    return torch.where(is_cutmix, (~inside).float(), lam.float()[:, None].expand(-1, num_tokens))
