"""Training from a teacher store: the teacher's answer for a view, read instead of computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..augment import ViewBatch
from ..config import RunConfig, to_dict
from ..data import ImageSource
from ..errors import UserError
from ..targets import TeacherPrediction
from ..targets.offline import check_provenance, file_sha256, first_difference
from .format import Manifest, augment_fingerprint, dense_from_topk


def check_matches_run(manifest: Manifest, cfg: RunConfig, source: ImageSource, folder: Path) -> None:
    """A store answers for the views of one dataset, augmentation, seed and teacher: any
    difference from the run is an error naming it."""
    where = f"teacher.store: {folder} was written for"
    if manifest.seed != cfg.seed:
        raise UserError(f"{where} seed {manifest.seed}, the run uses seed {cfg.seed}")
    check_provenance(where, manifest.dataset, manifest.teacher, manifest.k, cfg, source)
    diff = first_difference(manifest.augment, augment_fingerprint(to_dict(cfg.augment), cfg.data.mean, cfg.data.std), "augment.")
    if diff:
        raise UserError(f"{where} other views: {diff}")
    missing = [e for e in range(cfg.optim.epochs) if str(e) not in manifest.epochs]
    if missing:
        raise UserError(
            f"{where} {len(manifest.epochs)} complete epochs; the run needs {cfg.optim.epochs} "
            f"(missing from epoch {missing[0]}); complete it with `vitdistill cache` or train fewer epochs"
        )
    damaged = damaged_epochs(folder, manifest, range(cfg.optim.epochs))
    if damaged:
        raise UserError(
            f"teacher.store: {folder}: {len(damaged)} epoch files are damaged or missing ({damaged_reason(folder, manifest, damaged[0])}); "
            "rerun `vitdistill cache` with the store's recipe to rewrite them"
        )


class StoreTargets:
    """Reads the teacher's top-k for ``(batch.epoch, batch.view)`` and rebuilds dense targets.

    An epoch's records (``count x record_bytes``, 51 MB for ImageNet-1k at k=10) are checksummed
    and moved to the device once, at the epoch's first batch; each batch is then one gather.
    """

    def __init__(self, folder: str | Path, cfg: RunConfig, source: ImageSource, device: torch.device):
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        check_matches_run(self.manifest, cfg, source, self.folder)
        self.device = device
        self._loaded: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _records(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != epoch:
            array = read_epoch(self.folder, self.manifest, epoch, verify=True)
            ids = torch.from_numpy(np.ascontiguousarray(array["ids"])).to(self.device)
            probs = torch.from_numpy(np.ascontiguousarray(array["probs"])).to(self.device)
            self._loaded = (epoch, ids, probs)
        return self._loaded[1], self._loaded[2]

    def __call__(self, batch: ViewBatch) -> TeacherPrediction:
        ids, probs = self._records(batch.epoch)
        index = batch.view.to(self.device)  # the view's key: its record (== index without repeats)
        ids, probs = ids[index], probs[index]
        dense = dense_from_topk(ids, probs, self.manifest.num_classes)
        # ids are stored in decreasing probability: the first is argmax Z_t even where two
        # probabilities round to the same fp16 value
        return TeacherPrediction(probs=dense, temperature=self.manifest.temperature, top1=ids[:, 0].long())


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
