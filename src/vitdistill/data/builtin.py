"""Datasets that come with a library: scikit-learn's digits (offline) and torchvision's CIFAR."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from .source import ImageSource, cache_root, hash_items, limit_positions

DIGITS_TEST_EVERY = 5  # every 5th digit (by dataset order) is held out for evaluation


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits

    return load_digits()  # parsed once per process (about a second each time otherwise)


def open_digits(split: str, limit: int | None) -> ImageSource:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), shipped in its package.

    ``train`` is 4 of every 5 images in dataset order, ``test`` the 5th (1,437 / 360). Pixels are
    scaled to 0..255 and repeated over three channels.
    """
    if split not in ("train", "test"):
        raise UserError(f"data: the digits source has splits 'train' and 'test', not {split!r}")
    digits = _load_digits()
    order = np.arange(len(digits.target))
    held_out = order % DIGITS_TEST_EVERY == 0
    chosen = order[held_out] if split == "test" else order[~held_out]
    labels = digits.target[chosen].astype(np.int64)
    keep = limit_positions(labels.tolist(), limit)
    chosen, labels = chosen[keep], labels[keep]
    grey = np.rint(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    return ImageSource(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        classes=[str(d) for d in range(10)],
        name=f"digits/{split}",
        items_hash=hash_items([f"{i}\t{y}" for i, y in zip(chosen.tolist(), labels.tolist())]),
    )


def open_torchvision_cifar(cfg: DataConfig, split: str, limit: int | None) -> ImageSource:
    """torchvision's CIFAR-10/100 (binary release); ``download: true`` fetches it once."""
    from torchvision import datasets

    if split not in ("train", "test"):
        raise UserError(f"data: CIFAR has splits 'train' and 'test', not {split!r}")
    cls = datasets.CIFAR10 if cfg.source == "cifar10" else datasets.CIFAR100
    root = cfg.root or str(cache_root(cfg) / "torchvision")
    try:
        ds = cls(root=root, train=split == "train", download=cfg.download)
    except RuntimeError as err:
        raise UserError(f"data: {cfg.source} not found under {root} ({err}); set data.download=true to fetch it") from None
    labels = list(ds.targets)
    keep = limit_positions(labels, limit)
    return ImageSource(
        images=torch.from_numpy(np.ascontiguousarray(ds.data[keep])),
        labels=torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        classes=list(ds.classes),
        name=f"{cfg.source}/{split}",
        items_hash=hash_items([f"{i}\t{labels[i]}" for i in keep]),
    )
