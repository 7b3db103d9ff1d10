"""No blocking host<->device copy in a training step: views, teacher targets, forward, objective,
backward and update run with the device never waiting for the host (on a GPU each such copy is a
full synchronisation, which stops the host from queueing the next step's kernels).

The CPU has no second device, so the `meta` device stands in for the GPU and a dispatch mode
records every operator that moves data between the host and it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DEIT, tiny_run

from vitdistill import load_recipe
from vitdistill.bench.transfers import HostDeviceCopies
from vitdistill.data import train_batches
from vitdistill.device import DistEnv
from vitdistill.labelmaps import write_label_maps
from vitdistill.runner import build_trainer
from vitdistill.store import write_store

META = torch.device("meta")
VIEWS = ["augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0", "augment.rand_augment=rand-m9-mstd0.5-inc1", "augment.erase_prob=0.25"]


def copies_in_steps(cfg, steps: int = 2) -> HostDeviceCopies:
    """Build the run on the stand-in device, take one step (first-use caches may copy once), then
    record ``steps`` more: views of each batch, teacher targets, the update."""
    trainer = build_trainer(cfg, DistEnv(0, 1, META), cfg_output(cfg))
    views = trainer.train_views
    batches = views.train_batches(train_batches(len(views.source), cfg.optim.batch_size, views.rng, 0), 0)
    trainer.train_step(next(batches))
    with HostDeviceCopies() as mode:
        for _ in range(steps):
            trainer.train_step(next(batches))
    return mode


def cfg_output(cfg):
    from pathlib import Path

    return Path(cfg.output_dir)


@pytest.mark.parametrize("teacher", ["none", "online", "store", "label_maps"])
def test_a_training_step_makes_no_host_device_copy(teacher, tmp_path, tiny_teacher):
    extra = [*TINY_DEIT, *VIEWS]
    if teacher == "online":
        extra += [f"teacher.checkpoint={tiny_teacher}"]
    elif teacher == "store":
        store = tmp_path / "store"
        write_store(
            load_recipe(
                "demo_student_distilled",
                tiny_run(tmp_path / "u", *extra, f"teacher.checkpoint={tiny_teacher}", f"store.path={store}", "store.epochs=1"),
            )
        )
        extra += [
            f"teacher.checkpoint={tiny_teacher}",
            f"teacher.store={store}",
            "optim.epochs=1",
            "objective=[{term: ce, head: cls}, {term: kd_soft, head: dist}]",
        ]
    elif teacher == "label_maps":
        maps = tmp_path / "maps"
        extra = [*TINY_DEIT, "augment.cutmix_alpha=1.0"]
        write_label_maps(
            load_recipe("demo_student_distilled", tiny_run(tmp_path / "u", f"teacher.checkpoint={tiny_teacher}", f"labelmaps.path={maps}"))
        )
        extra += [
            f"teacher.label_maps={maps}",
            "teacher.checkpoint=null",
            "model.token_head=true",
            "objective=[{term: token_label, mixtoken: true}]",
        ]
    recipe = "demo_student" if teacher == "none" else "demo_student_distilled"
    mode = copies_in_steps(load_recipe(recipe, tiny_run(tmp_path / "run", *extra)))
    assert mode.to_device == [] and mode.to_host == []


def test_the_recorder_sees_a_blocking_copy():
    with HostDeviceCopies() as mode:
        x = torch.zeros(4, device=META)
        y = x + torch.tensor([1.0, 2.0, 3.0, 4.0]).to(META)  # what torch.tensor(list, device=cuda) does
        z = x * torch.tensor(2.0)  # a 0-d host scalar is passed by value: no copy
    assert mode.to_device and y.device == META and z.device == META


def test_jpeg_records_reach_the_device_only_through_non_blocking_copies(tmp_path):
    """JPEG records are decoded on the host ahead of the step (threads) and copied without a wait;
    nothing comes back to the host."""
    from helpers import photo_crops

    root = tmp_path / "photos"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
        for i, img in enumerate(photo_crops(8)):
            img.save(root / split / "ab"[i % 2] / f"{i}.jpg")
    data = [
        f"data.root={root}",
        "data.source=imagefolder",
        "data.source_size=16",
        "data.records=jpeg",
        "data.decoder=cpu",
        "data.train_limit=null",
        "data.eval_limit=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "optim.batch_size=2",
    ]
    mode = copies_in_steps(load_recipe("demo_student", tiny_run(tmp_path / "run", *TINY_DEIT, *VIEWS, *data)))
    assert mode.to_device and mode.blocking_to_device == [] and mode.to_host == []
