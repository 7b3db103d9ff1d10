"""JPEG records (issue 17): images resized once like raw records, stored as JPEG in bounded
shards, decoded per batch into the same zero-padded records; exact views, resumable builds,
corrupt images, the decoder in the fingerprint, and the disk check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitdistill.augment import Augmenter
from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import jpeg, open_source, records
from vitdistill.errors import UserError


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


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for split, count in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
        for i, img in enumerate(photo_crops(count, seed=len(split))):
            img.save(root / split / "ab"[i % 2] / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root


def cfg(root, tmp_path, **kw) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), source_size=40, decoder="cpu", **kw)


def test_jpeg_records_decode_to_records_of_the_same_shape_and_sizes(photos, tmp_path):
    raw = open_source(cfg(photos, tmp_path, records="raw"), "train")
    comp = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    assert isinstance(comp.images, jpeg.JpegRecords) and isinstance(raw.images, torch.Tensor)
    assert comp.image_size == raw.image_size == (40, 53) and torch.equal(comp.sizes, raw.sizes)
    assert comp.items_hash == raw.items_hash and len(comp) == len(raw) == 12
    decoded = comp.images[torch.arange(12)]
    assert decoded.dtype == torch.uint8 and decoded.shape == raw.images.shape
    for i, (h, w, t) in enumerate(comp.sizes.tolist()):
        rows, cols = (w, h) if t else (h, w)
        assert (decoded[i, rows:] == 0).all() and (decoded[i, :, cols:] == 0).all()  # padding stays zero
        # lossy, but close to the raw pixels (quality 90 on small photographs: a few levels; a misplaced image: ~60)
        assert (decoded[i, :rows, :cols].float() - raw.images[i, :rows, :cols].float()).abs().mean() < 8


def test_views_from_jpeg_records_equal_views_from_raw_records_of_the_same_pixels(photos, tmp_path):
    comp = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    pixels = comp.images[torch.arange(len(comp))]
    same = dataclasses.replace(comp, images=pixels, memory_mapped=False)  # raw records of the decoded pixels
    aug = AugmentConfig(input_size=16, mixup_alpha=0.8, cutmix_alpha=1.0, rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.25)
    a = Augmenter(comp, aug, 0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"), workers=2)
    b = Augmenter(same, aug, 0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"))
    assert not a.on_device and b.on_device  # the JPEG path is read ahead by threads
    steps = [torch.tensor([3, 7, 0, 11]), torch.tensor([5, 1, 2, 9])]
    for x, y in zip(a.train_batches(steps, 1), b.train_batches(steps, 1)):
        assert torch.equal(x.images, y.images) and torch.equal(x.boxes, y.boxes)
    assert torch.equal(a.eval_batch(torch.arange(4)).images, b.eval_batch(torch.arange(4)).images)
