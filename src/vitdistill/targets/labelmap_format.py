"""Label maps on disk: a folder with ``labelmaps.bin`` (fixed-size records in sample-index order,
read through ``numpy.memmap``) and ``manifest.json`` (written last; same integrity rules as the
teacher store: teacher, dataset, grid, k pinned, file checksum). Per image and location of the
teacher's grid: top-k class ids (int16, or int32 past 32,767 classes) and scores (fp16)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .offline import file_sha256, read_manifest

FORMAT = "vitdistill-label-maps/1"
RECORDS = "labelmaps.bin"
MANIFEST = "manifest.json"


def map_dtype(k: int, height: int, width: int, num_classes: int) -> np.dtype:
    ids = "<i2" if num_classes <= 32767 else "<i4"
    return np.dtype([("ids", ids, (height, width, k)), ("scores", "<f2", (height, width, k))])


@dataclass
class LabelMapManifest:
    k: int
    grid: list[int]  # [h, w] of the teacher's feature map
    num_classes: int
    count: int
    source_size: list[int]  # [H, W] of the cached source records the map covers
    dataset: dict
    teacher: dict
    precision: str
    sha256: str
    format: str = FORMAT

    @property
    def dtype(self) -> np.dtype:
        return map_dtype(self.k, self.grid[0], self.grid[1], self.num_classes)

    @classmethod
    def read(cls, folder: Path) -> LabelMapManifest:
        return cls(**read_manifest(folder, MANIFEST, FORMAT, "a label-map folder", "labelmaps"))


def read_records(folder: Path, manifest: LabelMapManifest) -> np.ndarray:
    """The maps' records (memory-mapped, read-only), checked against the manifest's size and checksum."""
    path = folder / RECORDS
    expected = manifest.count * manifest.dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise UserError(f"{path} is missing or has the wrong size (expected {expected:,} bytes): the label maps are damaged")
    if file_sha256(path) != manifest.sha256:
        raise UserError(f"{path} does not match its checksum in the manifest: the label maps are damaged")
    return np.memmap(path, dtype=manifest.dtype, mode="r", shape=(manifest.count,))
