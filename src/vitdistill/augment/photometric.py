"""Colour jitter and random erasing, batched and keyed by (seed, epoch, index).

Same semantics as torchvision's ``ColorJitter`` (brightness, contrast, saturation; we apply them in
a fixed order rather than torchvision's random order) and timm's ``RandomErasing`` (``mode='pixel'``,
one box, up to 10 tries); ours are batched on the device and replayable per sample, which the
originals (one image at a time, global random state) are not.
"""

from __future__ import annotations

import math

import torch

from ..rng import CounterRNG
from .geometry import first_true
from .mixing import box_mask

ERASE_TRIES = 10
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's), ``[B, 1, H, W]``."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def color_jitter(images: torch.Tensor, rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors ``f ~ U[max(0, 1 - s), 1 + s]`` per sample.

    brightness: ``x * f``; contrast: ``x * f + mean(grey(x)) * (1 - f)``;
    saturation: ``x * f + grey(x) * (1 - f)``; each result clamped to [0, 1].
    """
    u = rng.uniform(epoch, index, "color-jitter", 3).to(images.dtype)
    low = max(0.0, 1.0 - strength)
    f = (low + (1.0 + strength - low) * u).view(-1, 3, 1, 1, 1).unbind(dim=1)
    x = (images * f[0]).clamp(0, 1)
    x = (x * f[1] + grey(x).mean(dim=(1, 2, 3), keepdim=True) * (1 - f[1])).clamp(0, 1)
    return (x * f[2] + grey(x) * (1 - f[2])).clamp(0, 1)


def erase_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: int, width: int, prob: float) -> torch.Tensor:
    """timm's RandomErasing box per sample, ``(x1, y1, x2, y2)`` in pixels; empty when not erased.

    Area ``U[0.02, 1/3]`` of the image, log-aspect ``U[log 0.3, log 1/0.3]``; the first of 10 tries
    that fits strictly inside the image is used (none fits: nothing is erased).
    """
    u = rng.uniform(epoch, index, "erase", 1 + 4 * ERASE_TRIES)
    apply = u[:, 0] < prob
    # float64 from here: exp/sqrt may differ in the last bit between eager and compiled code, and
    # in float32 that flipped round() for ~1% of samples (exact 24-bit uniforms go in either way)
    t = u[:, 1:].view(-1, ERASE_TRIES, 4).to(torch.float64)
    area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * t[..., 0])
    aspect = torch.exp(ERASE_LOG_ASPECT[0] + (ERASE_LOG_ASPECT[1] - ERASE_LOG_ASPECT[0]) * t[..., 1])
    h = torch.round(torch.sqrt(area * aspect))
    w = torch.round(torch.sqrt(area / aspect))
    fits = (w < width) & (h < height)
    y1 = torch.floor(t[..., 2] * (height - h + 1))
    x1 = torch.floor(t[..., 3] * (width - w + 1))
    first = first_true(fits)
    pick = lambda v: torch.gather(v, 1, first).squeeze(1)  # noqa: E731
    boxes = torch.stack([pick(x1), pick(y1), pick(x1 + w), pick(y1 + h)], dim=1).to(torch.float32)
    keep = apply & fits.any(dim=1)
    return torch.where(keep[:, None], boxes, torch.zeros_like(boxes))


def noise_field(rng: CounterRNG, epoch: int | torch.Tensor, channels: int, height: int, width: int, device) -> torch.Tensor:
    """``[channels, 2 height, 2 width]`` i.i.d. ``N(0, 1)``, fixed by (seed, epoch)."""
    cells = torch.arange(channels * 4 * height * width, device=device)
    return rng.normal(epoch, cells, "erase-noise-field", 1).view(channels, 2 * height, 2 * width)


def erase_noise(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Per-pixel ``N(0, 1)`` noise for each sample: a window of the epoch's seeded noise field at
    a per-sample random offset. Within a sample the pixels are i.i.d. standard normal (samples of
    one epoch share the field, at different offsets); everything is keyed by (seed, epoch,
    index), so views replay. It costs one gather instead of hashing ``C x H x W`` numbers per
    sample (150k per sample at 224x224)."""
    n, c, height, width = shape
    field = noise_field(rng, epoch, c, height, width, index.device)
    u = rng.uniform(epoch, index, "erase-noise-offset", 2)
    oy = torch.floor(u[:, 0] * height).long()[:, None, None]
    ox = torch.floor(u[:, 1] * width).long()[:, None, None]
    rows = oy + torch.arange(height, device=index.device)[None, :, None]
    cols = ox + torch.arange(width, device=index.device)[None, None, :]
    flat = (rows * (2 * width) + cols).flatten(1)  # [B, H W] positions in one channel of the field
    return field.flatten(1)[:, flat].permute(1, 0, 2).reshape(n, c, height, width)


def random_erase(images: torch.Tensor, rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, prob: float) -> torch.Tensor:
    """Replace each sample's erase box by per-pixel ``N(0, 1)`` noise (normalised images)."""
    _, _, height, width = images.shape
    boxes = erase_boxes(rng, epoch, index, height, width, prob)
    inside = box_mask(boxes, height, width)[:, None]
    return torch.where(inside, erase_noise(rng, epoch, index, images.shape).to(images.dtype), images)
