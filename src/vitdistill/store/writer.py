"""``vitdistill cache``: run the teacher once per epoch on the exact training views, keep top-k.

Each epoch is written to a partial file (pre-sized; every process writes its own contiguous
range of sample indices, batch by batch), checksummed and renamed, then the manifest lists it.
An interrupted run (a signal, ``kill -9``) resumes at the first epoch not in the manifest, and
inside it at the first batch its process had not noted as written (:mod:`vitdistill.fill`); the
resumed store equals an uninterrupted one byte for byte (same processes, same batch size).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import fill
from ..augment import Augmenter
from ..config import RunConfig, to_dict
from ..config.paths import with_absolute_paths
from ..data import epoch_order
from ..data.records import check_disk
from ..device import DistEnv, autocast, barrier, setup_distributed
from ..errors import UserError
from ..formatting import format_duration
from ..lock import folder_lock
from ..progress import progress_bar
from ..signals import Preempted
from ..targets import OnlineTeacher
from ..targets.offline import CorruptManifest, file_sha256, first_difference, only_contents_differ, prepare_teacher_run, teacher_identity
from ..targets.store_format import (
    Manifest,
    augment_fingerprint,
    damaged_epochs,
    damaged_reason,
    describe_changed,
    epoch_file,
    topk_records,
    write_contents,
)


def new_manifest(cfg: RunConfig, source, teacher: OnlineTeacher, precision: str) -> Manifest:
    store = cfg.store
    k = store.k or source.num_classes
    if k > source.num_classes:
        raise UserError(f"store.k: {k} is more than the {source.num_classes} classes")
    return Manifest(
        seed=cfg.seed,
        k=k,
        temperature=store.temperature,
        num_classes=source.num_classes,
        count=len(source),
        repeats=cfg.augment.repeats,
        dataset=source.fingerprint(),
        augment=augment_fingerprint(to_dict(cfg.augment), cfg.data.mean, cfg.data.std),
        teacher=teacher_identity(cfg, teacher),
        precision=precision,
        epochs_planned=store.epochs or cfg.optim.epochs,
        recipe=to_dict(cfg),
    )


def check_same_plan(existing: Manifest, planned: Manifest, folder: Path) -> None:
    """Resuming into an existing store: everything but the epoch list must be the same."""
    for name in ("seed", "k", "temperature", "num_classes", "count", "dataset", "augment", "precision"):
        if name == "dataset" and only_contents_differ(existing.dataset, planned.dataset):
            continue  # the same samples with other pixels: the store is rewritten, not refused
        diff = first_difference(getattr(existing, name), getattr(planned, name), f"{name}.")
        if diff:
            raise UserError(f"{folder} already holds a store made differently ({diff}); choose another store.path")
    if existing.teacher["weights_sha256"] != planned.teacher["weights_sha256"]:
        raise UserError(f"{folder} already holds a store of another teacher ({existing.teacher['path']}); choose another store.path")


@torch.no_grad()
def teacher_probs(
    teacher: OnlineTeacher, views: Augmenter, index: torch.Tensor, epoch: int, temperature: float, env: DistEnv, precision: str
) -> torch.Tensor:
    """``softmax(Z_t / T)`` of the teacher on the training views of ``index`` in ``epoch``."""
    batch = views.train_batch(index, epoch)
    with autocast(env.device, precision):
        logits = teacher(batch).logits
    return torch.softmax(logits.float() / temperature, dim=1)


def write_store(cfg: RunConfig) -> Path:
    """Write (or complete) the store of ``cfg.store.path``; returns its folder. One writer per
    store (a lock); a signal stops it keeping the batches written (:class:`Preempted` says where)."""
    cfg = with_absolute_paths(cfg)  # the manifest's recipe must work from any folder (verify)
    env = setup_distributed(cfg.engine.device)
    folder, source, teacher, precision = prepare_teacher_run(cfg, cfg.store.path, "store.path", env.device, cfg.augment.input_size)
    with folder_lock(folder, "cache") if env.is_main else nullcontext():
        return _write_store(cfg, env, folder, source, teacher, precision)


def _write_store(cfg: RunConfig, env: DistEnv, folder: Path, source, teacher: OnlineTeacher, precision: str) -> Path:
    views = Augmenter(source, cfg.augment, cfg.seed, cfg.data.mean, cfg.data.std, env.device, cfg.data.placement, cfg.data.workers)
    manifest = new_manifest(cfg, source, teacher, precision)
    existing = None
    if (folder / "manifest.json").is_file():
        try:
            existing = Manifest.read(folder)
        except CorruptManifest:  # nothing in it can be trusted: the store is written again (below)
            if env.is_main:
                print(f"vitdistill: {folder / 'manifest.json'} is corrupt; writing the store again")
    if existing is not None:
        check_same_plan(existing, manifest, folder)
        manifest.epochs = existing.epochs
        if only_contents_differ(existing.dataset, manifest.dataset):  # every epoch holds stale records for the changed images
            if env.is_main:
                print(f"vitdistill: {folder}: {describe_changed(folder, source)}; rewriting its {len(manifest.epochs)} epochs")
            manifest.epochs = {}
            if env.is_main:
                manifest.write(folder)  # the new dataset, no epoch: an interruption from here on rewrites them all
        for epoch in damaged_epochs(folder, manifest):  # rewritten below, like a missing epoch
            if env.is_main:
                print(f"vitdistill: {folder}: epoch {epoch + 1}: {damaged_reason(folder, manifest, epoch)}; rewriting it")
            del manifest.epochs[str(epoch)]
    elif env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        manifest.write(folder)
    if env.is_main:
        write_contents(folder, source)
    barrier(env)
    todo = [e for e in range(manifest.epochs_planned) if str(e) not in manifest.epochs]
    # before the first epoch, on every process (they stop together): never a surprise on disk
    check_disk(
        len(todo) * manifest.count * manifest.repeats * manifest.record_bytes,
        folder,
        f"the {len(todo)} epochs left of the store",
        "lower store.k or store.epochs",
        key="store.path",
        elsewhere="choose a store.path on a larger disk",
    )
    n, batch_size = len(source), cfg.store.batch_size or cfg.optim.batch_size
    start, stop = env.rank * n // env.world, (env.rank + 1) * n // env.world  # this process's share of each epoch's n views
    steps = -(-(stop - start) // batch_size)
    bar = progress_bar(len(todo) * steps, 0, f"caching {folder.name}", cfg.engine.progress and env.is_main, unit="batch")
    began = time.perf_counter()
    key = f"batch{batch_size}"  # what a chunk holds: this process's next batch_size views
    for epoch in todo:
        target = folder / epoch_file(epoch)
        partial = fill.partial_path(target)
        # every process fills its range of one shared partial file; the main process renames it
        if env.is_main and not partial.is_file():
            fill.discard(target)
            np.memmap(partial, dtype=manifest.dtype, mode="w+", shape=(manifest.records,)).flush()
        barrier(env)
        records = np.memmap(partial, dtype=manifest.dtype, mode="r+", shape=(manifest.records,))
        keys = epoch_order(n, views.rng, epoch, manifest.repeats).sort().values  # the epoch's views (all of 0..n-1 without repeats)
        firsts = list(range(start, stop, batch_size))
        progress = fill.Progress(target, key, records.flush, env.rank, env.world, fill.chunks_done(target, key, env.rank, env.world))
        bar.update(progress.done)
        try:
            for first in firsts[progress.done :]:
                part = keys[first : min(first + batch_size, stop)]
                probs = teacher_probs(teacher, views, part.to(views.images.device), epoch, manifest.temperature, env, precision)
                records[part.numpy()] = topk_records(probs, manifest.k, manifest.dtype)
                progress.step()
                bar.update(1)
        except Preempted as stop:
            where = f"in epoch {epoch + 1} after {progress.done}/{len(firsts)} batches (kept in {partial.name})"
            raise Preempted(stop.signum, folder, where) from None
        finally:  # also on a signal: what is written is kept for the next run
            progress.save()
            del records
        barrier(env)
        if env.is_main:
            fill.finish(target)
            manifest.epochs[str(epoch)] = {"file": epoch_file(epoch), "sha256": file_sha256(target)}
            manifest.write(folder)
            bar.write(f"epoch {epoch + 1}/{manifest.epochs_planned} cached ({format_duration(time.perf_counter() - began)} so far)")
        barrier(env)
    bar.close()
    if env.is_main:
        print(describe_store(folder))
    return folder


def describe_store(folder: Path) -> str:
    """Size on disk and bytes per sample per epoch."""
    manifest = Manifest.read(folder)
    files = [folder / info["file"] for info in manifest.epochs.values()]
    size = sum(f.stat().st_size for f in files if f.is_file()) + (folder / "manifest.json").stat().st_size
    return (
        f"vitdistill: store {folder}: {len(manifest.epochs)}/{manifest.epochs_planned} epochs of {manifest.count:,} samples, "
        f"top-{manifest.k} at T={manifest.temperature:g}; {manifest.record_bytes} bytes per sample per epoch; "
        f"{size / 2**20:,.1f} MiB on disk"
    )
