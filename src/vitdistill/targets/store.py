"""A teacher store as a teacher source: the teacher's answer for a view, read instead of computed.

The store's format (:mod:`vitdistill.targets.store_format`) and its writer (``vitdistill cache``) live in
:mod:`vitdistill.store`; this is its reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..augment import ViewBatch
from ..config import RunConfig, TeacherConfig, to_dict
from ..data import ImageSource
from ..errors import ConfigError, UserError
from .offline import check_provenance, first_difference, only_contents_differ
from .prediction import TeacherPrediction
from .source import Request, TeacherSource, register_source
from .store_format import (
    Manifest,
    augment_fingerprint,
    damaged_epochs,
    damaged_reason,
    dense_from_topk,
    describe_changed,
    read_epoch,
)


def check_matches_run(manifest: Manifest, cfg: RunConfig, source: ImageSource, folder: Path) -> None:
    """A store answers for the views of one dataset, augmentation, seed and teacher: any
    difference from the run is an error naming it."""
    where = f"teacher.store: {folder} was written for"
    if only_contents_differ(manifest.dataset, source.fingerprint()):
        raise UserError(
            f"teacher.store: {folder}: {describe_changed(folder, source)}; rerun `vitdistill cache` with the store's recipe to rewrite it"
        )
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


@register_source
class StoreTargets(TeacherSource):
    """Reads the teacher's top-k for ``(batch.epoch, batch.view)`` and rebuilds dense targets.

    An epoch's records (``count x record_bytes``, 51 MB for ImageNet-1k at k=10) are checksummed
    and moved to the device once, at the epoch's first batch; each batch is then one gather.
    Chosen by ``teacher.store`` (the folder ``vitdistill cache`` wrote).
    """

    kind = "store"
    fields = ("store",)
    path_keys = ("store",)
    title = "a teacher store (teacher.store)"
    hint = "store (vitdistill cache)"
    gives = frozenset({"probs", "hard_labels"})
    needs = frozenset({"view_keys"})

    @classmethod
    def check(cls, teacher: TeacherConfig, key: str) -> None:
        if teacher.store is None:
            raise ConfigError(f"{key}.store", "kind store reads the store folder named here (vitdistill cache writes it)")

    @classmethod
    def from_recipe(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> StoreTargets:
        assert cfg.teacher is not None and cfg.teacher.store is not None
        return cls(cfg.teacher.store, cfg, source, device)

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
