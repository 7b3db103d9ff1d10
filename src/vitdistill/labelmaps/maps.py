"""Dense teacher label maps (LV-ViT's token labeling): what the teacher says about every region
of every training image, computed once on the whole image.

The teacher's classifier is applied at every location of its last feature map, as a 1x1
convolution: for a global-pool head, ``forward_head`` on a 1x1 "image" is exactly the classifier
at that location, so the mean of the per-location logits is the image's logits for linear
heads. Top-k scores (logits, fp16) and class ids (int16, or int32 past 32,767 classes) are kept
per location at the teacher's native grid. The map covers the whole cached source image (the
same pixels the student's crops are cut from, so crops and labels can never disagree).

The format on disk is :mod:`vitdistill.targets.labelmap_format`; its reader, a teacher source, is
:class:`vitdistill.targets.labelmaps.LabelMapTargets`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import fill
from ..atomic import write_text_atomic
from ..config import RunConfig
from ..config.paths import with_absolute_paths
from ..data import ImageSource
from ..device import autocast, resolve_device
from ..errors import UserError
from ..lock import folder_lock
from ..progress import progress
from ..signals import Preempted
from ..targets import OnlineTeacher
from ..targets.labelmap_format import MANIFEST, RECORDS, LabelMapManifest, map_dtype
from ..targets.offline import file_sha256, prepare_teacher_run, teacher_identity


def dense_scores(teacher: OnlineTeacher, images: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]``: the teacher's class scores at every location of its last feature map."""
    net = teacher.model.backbone
    features = net.forward_features(teacher.prepare(images))
    if features.dim() != 4:
        raise UserError(
            f"label maps need a convolutional teacher (a [B, C, h, w] feature map); {teacher.model.spec.name} gives {tuple(features.shape)}"
        )
    b, f, h, w = features.shape
    per_location = features.permute(0, 2, 3, 1).reshape(b * h * w, f, 1, 1)
    logits = net.forward_head(per_location)  # the classifier as a 1x1 convolution
    return logits.view(b, h, w, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def whole_image_scores(teacher: OnlineTeacher, source: ImageSource, index: torch.Tensor, mean, std, device, precision: str) -> torch.Tensor:
    """Dense scores of the whole cached records ``index`` (normalised like the student's views):
    the map covers each record as stored (a variable-sized image in its zero-padded record,
    portrait images transposed), so crop boxes map onto it as onto the pixels."""
    pixels = source.images[index].to(device)
    images = pixels.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
    mean_t, std_t = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)
    with autocast(device, precision):
        return dense_scores(teacher, (images - mean_t) / std_t).float()


def fill_records(
    target: Path, cfg: RunConfig, source: ImageSource, teacher: OnlineTeacher, k: int, dtype: np.dtype, batch: int, device, precision: str
) -> None:
    """Every image's top-k maps into ``target``, batch by batch; an interrupted run (a signal,
    ``kill -9``) continues at the first batch not noted as written (:mod:`vitdistill.fill`), and
    the file equals an uninterrupted run's byte for byte."""
    # what a batch holds: its images, the teacher's output kept (k, grid, dtype) and the teacher itself
    data = hashlib.sha256(json.dumps(source.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    key = f"batch{batch}-k{k}-{dtype.itemsize}-{data}-{teacher_identity(cfg, teacher)['weights_sha256'][:16]}-{precision}"
    partial = fill.partial_path(target)
    done = fill.chunks_done(target, key)
    if done == 0:
        fill.discard(target)
        np.memmap(partial, dtype=dtype, mode="w+", shape=(len(source),)).flush()
    records = np.memmap(partial, dtype=dtype, mode="r+", shape=(len(source),))
    starts = range(0, len(source), batch)
    note = fill.Progress(target, key, records.flush, done=done)
    try:
        for first in progress(
            starts[done:], total=len(starts) - done, desc=f"label maps {target.parent.name}", enabled=cfg.engine.progress
        ):
            index = torch.arange(first, min(first + batch, len(source)))
            scores, ids = whole_image_scores(teacher, source, index, cfg.data.mean, cfg.data.std, device, precision).topk(k, dim=1)
            records["ids"][first : first + len(index)] = ids.permute(0, 2, 3, 1).to(torch.int32).cpu().numpy()
            records["scores"][first : first + len(index)] = scores.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
            note.step()
    except Preempted as stop:
        raise Preempted(stop.signum, target.parent, f"after {note.done}/{len(starts)} batches (kept in {partial.name})") from None
    finally:  # also on a signal: what is written is kept for the next run
        note.save()
        del records
    fill.finish(target)


def write_label_maps(cfg: RunConfig) -> Path:
    """Compute and store the label maps of every training image (``cfg.labelmaps``)."""
    cfg = with_absolute_paths(cfg)
    device = resolve_device(cfg.engine.device)
    folder, source, teacher, precision = prepare_teacher_run(cfg, cfg.labelmaps.path, "labelmaps.path", device)
    k = min(cfg.labelmaps.k, source.num_classes)
    probe = whole_image_scores(teacher, source, torch.arange(1), cfg.data.mean, cfg.data.std, device, precision)
    grid = list(probe.shape[-2:])
    dtype = map_dtype(k, grid[0], grid[1], source.num_classes)
    with folder_lock(folder, "labelmaps"):
        (folder / MANIFEST).unlink(missing_ok=True)  # old maps, if any, are no longer described
        batch = cfg.labelmaps.batch_size or cfg.optim.batch_size
        fill_records(folder / RECORDS, cfg, source, teacher, k, dtype, batch, device, precision)
    manifest = LabelMapManifest(
        k=k,
        grid=grid,
        num_classes=source.num_classes,
        count=len(source),
        source_size=list(source.image_size),
        dataset=source.fingerprint(),
        teacher=teacher_identity(cfg, teacher),
        precision=precision,
        sha256=file_sha256(folder / RECORDS),
    )
    write_text_atomic(folder / MANIFEST, json.dumps(asdict(manifest), indent=1, sort_keys=True))
    size = (folder / RECORDS).stat().st_size
    print(
        f"vitdistill: label maps {folder}: {len(source):,} images, {grid[0]}x{grid[1]} locations, top-{k}; "
        f"{dtype.itemsize:,} bytes per image, {size / 2**20:,.1f} MiB"
    )
    return folder
