"""What every source gives (:class:`ImageSource`: a split decoded once into uint8 arrays; sample
``i`` has stable index ``i``) and the helpers the sources share (cache folder, item hashes,
class-balanced limits). Opening a split by its recipe is :mod:`.splits`.

The index is the sample's position in the split's sorted file list (ImageFolder) or in the
dataset's own order (CIFAR, digits, Hugging Face datasets), never a position in a shuffled
order: replayable views, teacher stores and label maps are keyed by it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig


@dataclass
class ImageSource:
    """Decoded images ``[N, H, W, 3]`` uint8 with labels ``[N]`` int64 and class names."""

    # [N, H, W, 3] uint8, or JPEG records (data.jpeg.JpegRecords) read like it: records[index]
    # decodes those records into the same zero-padded uint8 records
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str  # e.g. "imagefolder:cifar10/train"
    items_hash: str  # hash of the ordered sample list (file names + labels)
    memory_mapped: bool = False  # images read from disk on demand (larger than the RAM budget)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files left out (not_image, corrupt)
    # Variable-sized images: [N, 3] int32 true (height, width, transposed) of each zero-padded
    # record (portrait images are stored transposed); None when every image fills its record.
    sizes: torch.Tensor | None = None
    # What each decoded image is (:func:`vitdistill.data.decoded.record_digest`, [N] int64), for
    # sources decoded from files; None for fixed releases (digits, CIFAR). Stores and label maps
    # pin it, so a file replaced under the same name is noticed.
    contents: np.ndarray | None = None
    names: list[str] | None = None  # what sample i is called in messages (its file), default "sample i"

    def sample_name(self, index: int) -> str:
        return self.names[index] if self.names is not None else f"sample {index}"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """The record size ``(height, width)`` (every image's size when ``sizes`` is None)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def fingerprint(self) -> dict:
        """What identifies this split: stores and label maps pin it in their manifest."""
        return {
            "name": self.name,
            "count": len(self),
            "classes": list(self.classes),
            "items_sha256": self.items_hash,
            "image_size": list(self.image_size),
            **({"sizes_sha256": hashlib.sha256(self.sizes.numpy().tobytes()).hexdigest()} if self.sizes is not None else {}),
            # JPEG records: who decodes them (another library may differ in the last bit of a pixel)
            **({"decoder": self.images.decoder()} if not isinstance(self.images, torch.Tensor) else {}),
            **({"contents_sha256": hashlib.sha256(self.contents.tobytes()).hexdigest()} if self.contents is not None else {}),
        }


def hash_items(items: list[str]) -> str:
    # surrogateescape: a file name that is not UTF-8 (Python keeps its bytes as surrogates) hashes as its bytes
    return hashlib.sha256("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("VITDISTILL_CACHE") or Path.home() / ".cache" / "vitdistill"
    return Path(root).expanduser()


def balanced_order(labels: list[int]) -> list[int]:
    """Positions in round-robin class order (first of each class, then second, ...).

    Taking a prefix of this order gives a class-balanced slice that is stable when the
    limit changes (a slice of 100 is contained in a slice of 200).
    """
    per_class: dict[int, list[int]] = {}
    for pos, label in enumerate(labels):
        per_class.setdefault(label, []).append(pos)
    queues = [per_class[c] for c in sorted(per_class)]
    order, depth = [], 0
    while len(order) < len(labels):
        for queue in queues:
            if depth < len(queue):
                order.append(queue[depth])
        depth += 1
    return order


def limit_positions(labels: list[int], limit: int | None) -> list[int]:
    """Sorted positions of a class-balanced slice of ``limit`` samples (all when None)."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    return sorted(balanced_order(labels)[:limit])
