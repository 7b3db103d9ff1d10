"""The teacher store on disk: a folder with ``manifest.json`` and one record file per epoch.

Record ``i`` of ``epoch_0003.bin`` is what the teacher said about sample ``i``'s augmented view
in epoch 3 (with repeated augmentation, about view key ``i = index + repeat * count``): its top-k class ids (int16, or int32 past 32,767 classes) and probabilities (fp16).
Records are fixed-size and in sample-index order, so a file is read through ``numpy.memmap``
with O(1) lookup and no key dictionary. At k=10 a record is 40 bytes (TinyViT's format: 44).
The augmentation itself is not stored: it is re-derived from ``(seed, epoch, index)``.

The manifest pins what must match at read time (format version, teacher, dataset, augmentation,
seed, k, temperature) and lists each complete epoch with its file's checksum. Files are written
to a temporary name and renamed; the manifest is rewritten (atomically) after each epoch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..data import ImageSource
from ..errors import UserError
from .offline import CorruptManifest, file_sha256, read_manifest, repair_hint

FORMAT = "vitdistill-teacher-store/1"
MANIFEST = "manifest.json"
CONTENTS = "contents.npy"  # the digest of every sample's decoded image when the store was written (sources from files)


def record_dtype(k: int, num_classes: int) -> np.dtype:
    ids = "<i2" if num_classes <= 32767 else "<i4"
    return np.dtype([("ids", ids, (k,)), ("probs", "<f2", (k,))])


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:04d}.bin"


@dataclass
class Manifest:
    """Everything a reader must check before trusting the records."""

    seed: int
    k: int
    temperature: float
    num_classes: int
    count: int
    dataset: dict  # ImageSource.fingerprint()
    augment: dict  # the augmentation recipe and the normalisation the views were made with
    teacher: dict  # {"spec": ..., "weights_sha256": ..., "path": ...}
    precision: str  # "bf16" or "fp32": how the teacher ran
    epochs_planned: int
    recipe: dict  # the full recipe, so `vitdistill verify` can rebuild views and teacher
    epochs: dict[str, dict] = field(default_factory=dict)  # "3": {"file": ..., "sha256": ...}
    format: str = FORMAT
    repeats: int = 1  # augment.repeats: records are per view key (index + repeat * count)

    @property
    def records(self) -> int:
        """Records per epoch file: one per view key (those an epoch does not use stay zero)."""
        return self.count * self.repeats

    @property
    def dtype(self) -> np.dtype:
        return record_dtype(self.k, self.num_classes)

    @property
    def record_bytes(self) -> int:
        return self.dtype.itemsize

    def complete_epochs(self) -> list[int]:
        return sorted(int(e) for e in self.epochs)

    def write(self, folder: Path) -> None:
        write_text_atomic(folder / MANIFEST, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        data = read_manifest(folder, MANIFEST, FORMAT, "a teacher store", "cache", rewrites=True)
        try:
            return cls(**data)
        except TypeError as err:  # a key missing or unknown: edited by hand, or cut short
            raise CorruptManifest(f"{Path(folder) / MANIFEST} is corrupt ({err}); {repair_hint(folder, 'cache', True)}") from None


def augment_fingerprint(recipe_augment: dict, mean, std) -> dict:
    """What determines the pixels of a view besides (seed, epoch, index): the augmentation recipe
    and the normalisation (random erasing draws its noise in normalised units)."""
    return {"config": recipe_augment, "mean": list(mean), "std": list(std)}


def topk_records(probs: torch.Tensor, k: int, dtype: np.dtype) -> np.ndarray:
    """Records of a ``[B, C]`` probability batch: top-k ids and probabilities, on the host."""
    values, ids = probs.float().topk(k, dim=1)
    records = np.empty(probs.shape[0], dtype=dtype)
    records["ids"] = ids.to(torch.int32).cpu().numpy()
    records["probs"] = values.to(torch.float16).cpu().numpy()
    return records


def dense_from_topk(ids: torch.Tensor, probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, C]`` distributions: stored mass on stored ids; the remainder ``1 - sum(top-k)``
    spread evenly over the other ``C - k`` classes (clamped at zero)."""
    probs = probs.float()
    k = ids.shape[1]
    rest = num_classes - k
    fill = ((1.0 - probs.sum(dim=1, keepdim=True)) / max(rest, 1)).clamp_min(0.0) if rest else probs.new_zeros(probs.shape[0], 1)
    dense = fill.expand(-1, num_classes).clone()
    return dense.scatter_(1, ids.long(), probs)


def damaged_reason(folder: Path, manifest: Manifest, epoch: int) -> str | None:
    """Why epoch ``epoch``'s file cannot be trusted (missing, wrong size, checksum), or None."""
    info = manifest.epochs[str(epoch)]
    path = folder / info["file"]
    if not path.is_file():
        return f"{info['file']} is missing"
    expected = manifest.records * manifest.record_bytes
    if path.stat().st_size != expected:
        return f"{info['file']} has the wrong size ({path.stat().st_size:,} bytes instead of {expected:,})"
    if file_sha256(path) != info["sha256"]:
        return f"{info['file']} does not match its checksum"
    return None


def damaged_epochs(folder: Path, manifest: Manifest, epochs=None) -> list[int]:
    """The listed epochs (all, or those of ``epochs``) whose files are missing or damaged.
    Reads every file once (sha256 runs at about 1 GB/s: an ImageNet-1k epoch at k=10 is 51 MB)."""
    wanted = manifest.complete_epochs() if epochs is None else [e for e in epochs if str(e) in manifest.epochs]
    return [e for e in wanted if damaged_reason(folder, manifest, e) is not None]


def read_epoch(folder: Path, manifest: Manifest, epoch: int, verify: bool) -> np.ndarray:
    """One complete epoch's records (memory-mapped, read-only); ``verify`` checks the file's
    size and checksum against the manifest first."""
    info = manifest.epochs.get(str(epoch))
    if info is None:
        raise UserError(f"{folder}: epoch {epoch} is not in the store (complete: {manifest.complete_epochs()})")
    path = folder / info["file"]
    expected = manifest.records * manifest.record_bytes
    if not path.is_file() or path.stat().st_size != expected:
        raise UserError(f"{path} is missing or has the wrong size (expected {expected:,} bytes): the store is damaged")
    if verify and file_sha256(path) != info["sha256"]:
        raise UserError(f"{path} does not match its checksum in the manifest: the store is damaged")
    return np.memmap(path, dtype=manifest.dtype, mode="r", shape=(manifest.records,))


def write_contents(folder: Path, source: ImageSource) -> None:
    """Keep the digest of every sample's image beside the manifest (sources decoded from files),
    so that a changed dataset can be told sample by sample."""
    if source.contents is None:
        return
    with atomic_path(folder / CONTENTS) as tmp, open(tmp, "wb") as f:
        np.save(f, source.contents)


def changed_samples(folder: Path, source: ImageSource) -> list[int] | None:
    """The samples whose decoded image differs from when the store was written, or None when the
    store kept no digests to compare with (written before they were kept)."""
    path = folder / CONTENTS
    if source.contents is None or not path.is_file():
        return None
    with open(path, "rb") as f:
        stored = np.load(f)
    if stored.shape != source.contents.shape:
        return None
    return np.flatnonzero(stored != source.contents).tolist()


def describe_changed(folder: Path, source: ImageSource) -> str:
    """How the images differ from the store's, naming the first samples that changed."""
    changed = changed_samples(folder, source)
    if not changed:
        return "its images have changed since it was written"
    names = ", ".join(source.sample_name(i) for i in changed[:3]) + (", ..." if len(changed) > 3 else "")
    return f"{len(changed):,} of its images changed since it was written ({names})"
