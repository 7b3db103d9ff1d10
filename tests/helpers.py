"""Test helpers shared by test files in different folders (tests/ is on the import path: see conftest)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from vitdistill.augment import ViewBatch
from vitdistill.data import ImageSource


def batch_of(labels, partner_labels=None, lam=None, mix_boxes=None, size=2) -> ViewBatch:
    """A hand-made batch of ``size`` x ``size`` views (only the records matter to the terms)."""
    labels = torch.tensor(labels)
    n = len(labels)
    return ViewBatch(
        images=torch.zeros(n, 3, size, size),
        labels=labels,
        index=torch.arange(n),
        epoch=0,
        boxes=torch.zeros(n, 4),
        flips=torch.zeros(n, dtype=torch.bool),
        partner=torch.arange(n),
        partner_labels=labels if partner_labels is None else torch.tensor(partner_labels),
        partner_boxes=torch.zeros(n, 4),
        partner_flips=torch.zeros(n, dtype=torch.bool),
        lam=torch.ones(n) if lam is None else torch.tensor(lam, dtype=torch.float32),
        mix_boxes=torch.zeros(n, 4) if mix_boxes is None else torch.tensor(mix_boxes, dtype=torch.float32),
    )


def contrast_by_loop(first: torch.Tensor, last: torch.Tensor, tau: float) -> float:
    """The equation, one patch at a time, in float64."""
    first, last = first.double(), last.double()
    b_count, n, _ = last.shape
    total = 0.0
    for b in range(b_count):
        z = [last[b, j] / last[b, j].norm() for j in range(n)]
        for i in range(n):
            a = first[b, i] / first[b, i].norm()
            zbar = sum(z[j] for j in range(n) if j != i) / (n - 1)
            pos, neg = math.exp(float(a @ z[i]) / tau), math.exp(float(a @ zbar) / tau)
            total += -math.log(pos / (pos + neg))
    return total / (b_count * n)


def synthetic_source(n: int = 24, size: int = 12) -> ImageSource:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8)
    return ImageSource(images=images, labels=torch.arange(n) % 4, classes=list("abcd"), name="synthetic", items_hash="x")


def photo_crops(count: int, seed: int = 0):
    """Distinct photographs: random crops and scales of scikit-learn's two sample photos, with
    landscape, portrait and over-wide shapes (not noise or flat colours)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    shapes = [(120, 90), (90, 120), (200, 80), (96, 96)]
    for i in range(count):
        photo = photos[i % 2]
        w, h = shapes[i % len(shapes)]
        scale = rng.uniform(1.0, 3.0)
        cw, ch = min(photo.width, int(w * scale)), min(photo.height, int(h * scale))
        x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        yield photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
