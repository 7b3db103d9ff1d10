"""``vitdistill verify STORE``: recompute a random sample of records with the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..augment import Augmenter
from ..config import parse_config
from ..data import epoch_order, open_source
from ..device import DistEnv, resolve_device
from ..errors import UserError
from ..targets import build_online_teacher
from ..targets.offline import first_difference, only_contents_differ, teacher_identity
from ..targets.store_format import Manifest, changed_samples, damaged_epochs, describe_changed, read_epoch
from .writer import teacher_probs

# Largest |stored - recomputed| probability accepted by default: fp16 storage rounds a probability
# by at most 2^-11 (~4.9e-4); a bf16 teacher run on another batch composition moves more.
TOLERANCE = {"fp32": 2e-3, "bf16": 5e-2}


def verify_store(
    folder: str | Path,
    samples: int = 256,
    epochs: list[int] | None = None,
    teacher: str | None = None,
    device: str = "auto",
    tolerance: float | None = None,
    min_agreement: float = 0.99,
    seed: int = 0,
) -> dict:
    """Checksums of every epoch file, then ``samples`` random records per checked epoch
    recomputed from the regenerated views: top-1 agreement and the largest probability error,
    naming the samples whose images changed since the store was written and those whose stored
    top-1 disagrees. ``ok`` is False on a checksum failure, a changed image, agreement below
    ``min_agreement`` or an error above ``tolerance``."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    overrides = [f"engine.device={device}"]
    if teacher is not None:
        overrides += [f"teacher.checkpoint={teacher}", "teacher.name=null", "teacher.weights=null"]
    cfg = parse_config(manifest.recipe, overrides)  # validated in full when the store was written
    bad_files = [manifest.epochs[str(e)]["file"] for e in damaged_epochs(folder, manifest)]
    source = open_source(cfg.data, cfg.data.train_split, cfg.data.train_limit)
    changed: list[str] = []
    if only_contents_differ(manifest.dataset, source.fingerprint()):  # same samples, other pixels: name them
        found = changed_samples(folder, source)
        changed = [source.sample_name(i) for i in found] if found else [describe_changed(folder, source)]
    else:
        diff = first_difference(manifest.dataset, source.fingerprint(), "dataset.")
        if diff:
            raise UserError(f"verify: the data the store was made from has changed: {diff}")
    env = DistEnv(rank=0, world=1, device=resolve_device(device))
    online = build_online_teacher(cfg.teacher, source, cfg.data.mean, cfg.data.std, cfg.augment.input_size).to(env.device)
    if teacher_identity(cfg, online)["weights_sha256"] != manifest.teacher["weights_sha256"]:
        raise UserError(f"verify: {teacher or manifest.teacher['path']} is not the teacher that wrote the store")
    views = Augmenter(source, cfg.augment, cfg.seed, cfg.data.mean, cfg.data.std, env.device)
    checked = [
        e
        for e in (epochs if epochs is not None else manifest.complete_epochs())
        if str(manifest.epochs.get(str(e), {}).get("file")) not in bad_files
    ]
    rng = np.random.default_rng(seed)
    agree, total, worst = 0, 0, 0.0
    disagreeing: list[str] = []
    for epoch in checked:
        keys = epoch_order(manifest.count, views.rng, epoch, manifest.repeats).sort().values.numpy()  # the views the epoch has
        index = torch.from_numpy(np.sort(rng.choice(keys, size=min(samples, manifest.count), replace=False)))
        stored = read_epoch(folder, manifest, epoch, verify=False)[index.numpy()]
        probs = teacher_probs(online, views, index, epoch, manifest.temperature, env, manifest.precision).cpu()
        ids = torch.from_numpy(stored["ids"].astype(np.int64))
        values = torch.from_numpy(stored["probs"].astype(np.float32))
        same = ids[:, 0] == probs.argmax(dim=1)
        agree += int(same.sum())
        sample = index.numpy() % manifest.count  # view key -> sample (keys beyond count are repeats)
        disagreeing += [f"epoch {epoch}: {source.sample_name(int(sample[j]))}" for j in np.flatnonzero(~same.numpy())]
        total += len(index)
        worst = max(worst, float((values - probs.gather(1, ids)).abs().max()))
    tolerance = TOLERANCE[manifest.precision] if tolerance is None else tolerance
    agreement = agree / total if total else 1.0
    return {
        "store": str(folder),
        "epochs_checked": checked,
        "samples_per_epoch": min(samples, manifest.count),
        "top1_agreement": agreement,
        "max_prob_error": worst,
        "tolerance": tolerance,
        "checksum_failures": bad_files,
        "changed_samples": changed,  # images that differ from those the store was written from
        "disagreeing": disagreeing,  # "epoch E: sample" where the stored top-1 is not the teacher's now
        "ok": not bad_files and not changed and agreement >= min_agreement and worst <= tolerance,
    }
