"""From sample indices to a batch of augmented, normalised views with their records.

The view of sample ``index`` in ``epoch`` is a pure function of ``(seed, epoch, index)``: the
same triple gives the same pixels on any batch size or process count. Besides the pixels, a
:class:`ViewBatch` records what later stages need to reason about the view (crop box in source
coordinates, flip, mixing partner, lambda and cutmix box).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AugmentConfig
from ..data import ImageSource
from ..rng import CounterRNG
from .geometry import centre_boxes, render, sample_boxes, sample_flips
from .mixing import MixPlan, apply_mixing, mixing_enabled, partner_table, plan_mixing


@dataclass
class ViewBatch:
    """Augmented views of a batch of samples and how each was made."""

    images: torch.Tensor  # [B, 3, S, S] float, normalised with the data mean/std
    labels: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64 stable sample ids
    epoch: int  # -1 for evaluation views
    boxes: torch.Tensor  # [B, 4] crop box (x1, y1, x2, y2) in source pixels
    flips: torch.Tensor  # [B] bool, horizontal flip applied after the crop
    partner: torch.Tensor  # [B] int64 mixing partner (== index when unmixed)
    partner_labels: torch.Tensor  # [B] int64
    lam: torch.Tensor  # [B] own share of the image/label (1.0 when unmixed)
    mix_boxes: torch.Tensor  # [B, 4] cutmix region in output pixels (empty when none)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def label_targets(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """``[B, C]`` label distribution: ``lam * y_i + (1 - lam) * y_partner``, each smoothed."""
        off = smoothing / num_classes
        own = F.one_hot(self.labels, num_classes).float() * (1.0 - smoothing) + off
        other = F.one_hot(self.partner_labels, num_classes).float() * (1.0 - smoothing) + off
        lam = self.lam.float()[:, None]
        return lam * own + (1.0 - lam) * other


class Augmenter:
    """Makes training and evaluation views of one split, on the device where the images are."""

    def __init__(self, source: ImageSource, cfg: AugmentConfig, seed: int, mean, std, device: torch.device):
        self.source = source
        self.cfg = cfg
        self.rng = CounterRNG(seed)
        self.device = device
        self.images = place_images(source.images, device)
        self.labels = source.labels.to(device)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._partners: tuple[int, torch.Tensor] | None = None

    @property
    def height(self) -> int:
        return self.source.image_size[0]

    @property
    def width(self) -> int:
        return self.source.image_size[1]

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index.to(self.images.device)].to(self.device, non_blocking=True)

    def _partners_for(self, epoch: int) -> torch.Tensor:
        if self._partners is None or self._partners[0] != epoch:
            self._partners = (epoch, partner_table(self.rng, epoch, len(self.source)).to(self.device))
        return self._partners[1]

    def _views(self, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-normalised [0, 1] views, crop boxes and flips of ``index`` in ``epoch``."""
        cfg = self.cfg
        boxes = sample_boxes(self.rng, epoch, index, self.height, self.width, cfg)
        flips = sample_flips(self.rng, epoch, index, cfg.hflip)
        pad = cfg.pad if cfg.crop == "pad" else 0
        return render(self._gather(index), boxes, flips, cfg.input_size, pad), boxes, flips

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def train_batch(self, index: torch.Tensor, epoch: int) -> ViewBatch:
        """The training views of ``index`` (a 1-D int64 tensor) in ``epoch``."""
        index = index.to(self.device)
        images, boxes, flips = self._views(index, epoch)
        plan = self._plan(index, epoch)
        if mixing_enabled(self.cfg):
            partner_images, _, _ = self._views(plan.partner, epoch)
            images = apply_mixing(images, partner_images, plan)
        return ViewBatch(
            images=self.normalise(images),
            labels=self.labels[index],
            index=index,
            epoch=epoch,
            boxes=boxes,
            flips=flips,
            partner=plan.partner,
            partner_labels=self.labels[plan.partner],
            lam=plan.lam,
            mix_boxes=plan.box,
        )

    def _plan(self, index: torch.Tensor, epoch: int) -> MixPlan:
        if mixing_enabled(self.cfg):
            return plan_mixing(self.rng, epoch, index, self._partners_for(epoch), self.cfg, self.cfg.input_size)
        n = index.shape[0]
        false = torch.zeros(n, dtype=torch.bool, device=self.device)
        return MixPlan(partner=index, lam=torch.ones(n, device=self.device), box=torch.zeros(n, 4, device=self.device), is_cutmix=false, is_mixed=false)

    def eval_batch(self, index: torch.Tensor) -> ViewBatch:
        """Deterministic evaluation views: centre crop of ``eval_crop_pct``, resized."""
        index = index.to(self.device)
        n = index.shape[0]
        boxes = centre_boxes(n, self.height, self.width, self.device, self.cfg.eval_crop_pct)
        flips = torch.zeros(n, dtype=torch.bool, device=self.device)
        images = render(self._gather(index), boxes, flips, self.cfg.input_size)
        labels = self.labels[index]
        return ViewBatch(
            images=self.normalise(images),
            labels=labels,
            index=index,
            epoch=-1,
            boxes=boxes,
            flips=flips,
            partner=index,
            partner_labels=labels,
            lam=torch.ones(n, device=self.device),
            mix_boxes=torch.zeros(n, 4, device=self.device),
        )


def place_images(images: torch.Tensor, device: torch.device, max_fraction: float = 0.4) -> torch.Tensor:
    """Keep the uint8 image array on the GPU when it fits in ``max_fraction`` of free memory,
    else in pinned host memory (copied per batch without blocking)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() <= max_fraction * free:
        return images.to(device)
    return images.pin_memory()
