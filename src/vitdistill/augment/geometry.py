"""Crop boxes and flips, sampled per sample from the counter RNG, and their batched rendering.

Boxes are ``(x1, y1, x2, y2)`` in source-image pixel-edge coordinates (the source image spans
``[0, W] x [0, H]``), the convention of ``torchvision.ops.roi_align``. Rendering uses
``roi_align(aligned=True)`` with adaptive sampling: crop and resize in one batched call, with
area averaging when a crop is shrunk. We write the samplers ourselves because torchvision's
transforms draw from a global stateful generator, one image at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..config import AugmentConfig
from ..rng import CounterRNG

RRC_TRIES = 10


def rrc_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: int, width: int, scale, ratio) -> torch.Tensor:
    """Random-resized-crop boxes with torchvision's algorithm (10 tries, then a centre crop)."""
    # float64: exp/sqrt may differ in the last bit between eager and compiled code, which in
    # float32 can flip round(); the 24-bit uniforms themselves are exact either way
    u = rng.uniform(epoch, index, "rrc", 4 * RRC_TRIES).view(-1, RRC_TRIES, 4).to(torch.float64)
    area = float(height * width)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    x1 = torch.floor(u[..., 2] * (width - w + 1))
    y1 = torch.floor(u[..., 3] * (height - h + 1))
    first = first_true(ok)
    pick = lambda t: torch.gather(t, 1, first).squeeze(1)  # noqa: E731
    w, h, x1, y1 = pick(w), pick(h), pick(x1), pick(y1)
    # Fallback (no try fitted): the largest centred crop with the aspect clamped to `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    found = ok.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    x1 = torch.where(found, x1, torch.full_like(x1, (width - fw) // 2))
    y1 = torch.where(found, y1, torch.full_like(y1, (height - fh) // 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).to(torch.float32)


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]``: the position of the first True of each row of ``[B, T]`` (any position when
    none). Written as the argmax of distinct scores: argmax's "first of equal maxima" holds in
    eager mode but not in compiled code (inductor returned other tries for ~1% of samples)."""
    tries = mask.shape[1]
    score = mask.to(torch.int64) * (tries - torch.arange(tries, device=mask.device))
    return torch.argmax(score, dim=1, keepdim=True)


def pad_crop_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: int, width: int, pad: int) -> torch.Tensor:
    """Pad-and-crop (the CIFAR recipe): a source-sized window shifted by up to ``pad`` pixels."""
    u = rng.uniform(epoch, index, "padcrop", 2)
    dx = torch.floor(u[:, 0] * (2 * pad + 1)) - pad
    dy = torch.floor(u[:, 1] * (2 * pad + 1)) - pad
    return torch.stack([dx, dy, dx + width, dy + height], dim=1)


def constant_boxes(n: int, box: tuple[float, float, float, float], device) -> torch.Tensor:
    """``[n, 4]`` copies of one box, filled on the device (``torch.tensor(list, device=cuda)``
    would be a blocking host-to-device copy)."""
    return torch.stack([torch.full((n,), float(v), dtype=torch.float32, device=device) for v in box], dim=1)


def centre_boxes(n: int, height: int, width: int, device, crop_pct: float = 1.0) -> torch.Tensor:
    """The centred square crop of ``crop_pct`` of the short side (the evaluation view)."""
    side = crop_pct * min(height, width)
    x1, y1 = (width - side) / 2, (height - side) / 2
    return constant_boxes(n, (x1, y1, x1 + side, y1 + side), device)


def full_boxes(n: int, height: int, width: int, device) -> torch.Tensor:
    return constant_boxes(n, (0.0, 0.0, width, height), device)


def sample_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: int, width: int, cfg: AugmentConfig) -> torch.Tensor:
    """The training crop box of every sample."""
    if cfg.crop == "rrc":
        return rrc_boxes(rng, epoch, index, height, width, cfg.scale, cfg.ratio)
    if cfg.crop == "pad":
        return pad_crop_boxes(rng, epoch, index, height, width, cfg.pad)
    return full_boxes(index.shape[0], height, width, index.device)


def sample_flips(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, prob: float) -> torch.Tensor:
    return rng.uniform(epoch, index, "hflip", 1)[:, 0] < prob


def render(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, pad: int = 0) -> torch.Tensor:
    """Crop ``boxes`` out of uint8 ``[B, H, W, 3]`` images, resize to ``size``, flip.

    Returns float ``[B, 3, size, size]`` in [0, 1]. Boxes may reach ``pad`` pixels outside the
    image; that part is zeros (the batch is zero-padded before ``roi_align``).
    """
    x = images.permute(0, 3, 1, 2).float()
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    rois = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype) + pad], dim=1)
    out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out * (1.0 / 255.0)
