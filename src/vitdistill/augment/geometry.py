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


Size = int | torch.Tensor  # one size for the batch, or one per sample ([B])


def per_sample(value: Size, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` float64: a batch-wide size, or each sample's (variable-sized sources)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float64).reshape(-1, 1)
    return torch.full((like.shape[0], 1), float(value), dtype=torch.float64, device=like.device)


def rrc_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: Size, width: Size, scale, ratio) -> torch.Tensor:
    """Random-resized-crop boxes with torchvision's algorithm (10 tries, then a centre crop),
    over each sample's whole image."""
    # float64: exp/sqrt may differ in the last bit between eager and compiled code, which in
    # float32 can flip round(); the 24-bit uniforms themselves are exact either way
    u = rng.uniform(epoch, index, "rrc", 4 * RRC_TRIES).view(-1, RRC_TRIES, 4).to(torch.float64)
    height, width = per_sample(height, index), per_sample(width, index)  # [B, 1]
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    x1 = torch.floor(u[..., 2] * (width - w + 1))
    y1 = torch.floor(u[..., 3] * (height - h + 1))
    first, found = first_true(ok)
    pick = lambda t: torch.gather(t, 1, first).squeeze(1)  # noqa: E731
    w, h, x1, y1 = pick(w), pick(h), pick(x1), pick(y1)
    # Fallback (no try fitted): the largest centred crop with the aspect clamped to `ratio`.
    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fw = torch.where(wide, torch.round(height * ratio[1]), width)
    fh = torch.where(narrow, torch.round(width / ratio[0]), height)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    x1 = torch.where(found, x1, torch.floor((width - fw) / 2))
    y1 = torch.where(found, y1, torch.floor((height - fh) / 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).to(torch.float32)


def first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, 1], [B])``: the position of the first True of each row of ``[B, T]`` (the last
    position when none) and whether the row has one: the count of leading Falses.

    Not ``argmax``: its "first of equal maxima" is eager behaviour that compiled code did not
    keep (torch 2.11 picked other tries for ~1% of samples), and reductions such as ``max(dim)``
    or a second ``any`` over the same mask broke or miscompiled inductor (torch 2.5, 2.11).
    A cumulative sum and a sum compile alike everywhere."""
    tries = mask.shape[1]
    leading = (mask.to(torch.int32).cumsum(dim=1) == 0).to(torch.int32).sum(dim=1)
    return leading.clamp(max=tries - 1).to(torch.int64)[:, None], leading < tries


def pad_crop_boxes(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: Size, width: Size, pad: int) -> torch.Tensor:
    """Pad-and-crop (the CIFAR recipe): the centred square of the short side (the whole image
    when square), shifted by up to ``pad`` pixels."""
    u = rng.uniform(epoch, index, "padcrop", 2)
    height, width = per_sample(height, index)[:, 0], per_sample(width, index)[:, 0]
    side = torch.minimum(height, width)
    dx = torch.floor(u[:, 0] * (2 * pad + 1)) - pad
    dy = torch.floor(u[:, 1] * (2 * pad + 1)) - pad
    x1, y1 = torch.floor((width - side) / 2) + dx, torch.floor((height - side) / 2) + dy
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1).to(torch.float32)


def constant_boxes(n: int, box: tuple[float, float, float, float], device) -> torch.Tensor:
    """``[n, 4]`` copies of one box, filled on the device (``torch.tensor(list, device=cuda)``
    would be a blocking host-to-device copy)."""
    return torch.stack([torch.full((n,), float(v), dtype=torch.float32, device=device) for v in box], dim=1)


def centre_boxes(n: int, height: Size, width: Size, device, crop_pct: float = 1.0) -> torch.Tensor:
    """The centred square crop of ``crop_pct`` of the short side (the evaluation view: timm's
    resize to ``input_size / crop_pct`` then centre crop), per sample for variable sizes."""
    if not isinstance(height, torch.Tensor) and not isinstance(width, torch.Tensor):
        side = crop_pct * min(height, width)
        x1, y1 = (width - side) / 2, (height - side) / 2
        return constant_boxes(n, (x1, y1, x1 + side, y1 + side), device)
    anchor = torch.zeros(n, device=device)
    height, width = per_sample(height, anchor)[:, 0], per_sample(width, anchor)[:, 0]
    side = crop_pct * torch.minimum(height, width)
    x1, y1 = (width - side) / 2, (height - side) / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1).to(torch.float32)


def sample_boxes(
    rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, height: Size, width: Size, cfg: AugmentConfig
) -> torch.Tensor:
    """The training crop box of every sample (``crop: none`` is the centred square of the short
    side: the whole image when square, and the evaluation view's geometry otherwise)."""
    if cfg.crop == "rrc":
        return rrc_boxes(rng, epoch, index, height, width, cfg.scale, cfg.ratio)
    if cfg.crop == "pad":
        return pad_crop_boxes(rng, epoch, index, height, width, cfg.pad)
    return centre_boxes(index.shape[0], height, width, index.device)


def sample_flips(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, prob: float) -> torch.Tensor:
    return rng.uniform(epoch, index, "hflip", 1)[:, 0] < prob


def render(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, pad: int = 0, transposed: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop ``boxes`` out of uint8 ``[B, H, W, 3]`` records, resize to ``size``, flip.

    Returns float ``[B, 3, size, size]`` in [0, 1]. Boxes may reach ``pad`` pixels outside the
    image; that part is zeros (the batch is zero-padded before ``roi_align``). ``transposed``
    ([B] bool): records that hold their image transposed (portrait images of variable-sized
    sources); their boxes, given in the image's own orientation, are read transposed and the
    crop is transposed back, before the flip.
    """
    x = images.permute(0, 3, 1, 2).float()
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    if transposed is not None:
        boxes = torch.where(transposed[:, None], boxes[:, [1, 0, 3, 2]], boxes)
    rois = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype) + pad], dim=1)
    out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if transposed is not None:
        out = torch.where(transposed[:, None, None, None], out.transpose(-1, -2), out)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out * (1.0 / 255.0)
