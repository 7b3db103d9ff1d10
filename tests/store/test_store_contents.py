"""A teacher store pins the pixels of the images it was written from (issue 19, case 1): an image
replaced under the same name and size is refused at training time naming it, `verify` names it,
and `vitdistill cache` rewrites the store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run
from PIL import Image

from vitdistill import UserError, load_recipe
from vitdistill.cli import main
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.store import verify_store, write_store
from vitdistill.targets.store import StoreTargets


def digits_folder(root: Path, per_class: int = 4) -> Path:
    """The digits as an ImageFolder (classes "0".."9", the tiny teacher's)."""
    for split in ("train", "test"):
        digits = open_source(DataConfig(source="digits"), split)
        counts: dict[int, int] = {}
        for image, label in zip(digits.images.numpy(), digits.labels.tolist()):
            if counts.get(label, 0) == per_class:
                continue
            path = root / split / str(label) / f"{counts.get(label, 0)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            counts[label] = counts.get(label, 0) + 1
    return root


def folder_cfg(tmp_path, teacher, root):
    return load_recipe(
        "demo_student_distilled",
        tiny_run(
            tmp_path / "run",
            f"teacher.checkpoint={teacher}",
            f"store.path={tmp_path / 'store'}",
            "store.k=3",
            "store.epochs=2",
            "data.source=imagefolder",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.train_limit=null",
            "data.eval_limit=null",
            "optim.batch_size=8",
            "optim.epochs=2",
        ),
    )


def replace_keeping_size_and_time(target: Path, donor: Path) -> None:
    """Another image (``donor`` inverted) under ``target``'s name, with the same dimensions: the
    names, labels and image sizes a store pinned before are all unchanged."""
    stat = target.stat()
    data = np.asarray(Image.open(donor))
    Image.fromarray(255 - data).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the decode cache must still see it (mtime)


def test_a_changed_image_is_refused_named_by_verify_and_rewritten_by_cache(tmp_path, tiny_teacher, capsys):
    root = digits_folder(tmp_path / "data")
    cfg = folder_cfg(tmp_path, tiny_teacher, root)
    folder = write_store(cfg)
    source = open_source(cfg.data, "train")
    StoreTargets(folder, cfg, source, source.images.device)  # the store matches its data
    original = (folder / "epoch_0001.bin").read_bytes()

    replace_keeping_size_and_time(root / "train" / "3" / "1.png", root / "train" / "3" / "1.png")
    changed = open_source(cfg.data, "train")
    assert changed.fingerprint()["items_sha256"] == source.fingerprint()["items_sha256"]  # same names and labels
    with pytest.raises(UserError, match=r"1 of its images changed since it was written \(3/1.png\).*vitdistill cache"):
        StoreTargets(folder, cfg, changed, changed.images.device)

    report = verify_store(folder, samples=40)
    assert not report["ok"] and report["changed_samples"] == ["3/1.png"]
    capsys.readouterr()
    assert main(["verify", str(folder), "--samples", "40"]) == 1
    out = capsys.readouterr().out
    assert "images changed since the store was written: 3/1.png" in out and "MISMATCH" in out

    write_store(cfg)  # rewrites what no longer matches
    assert "1 of its images changed" in capsys.readouterr().out
    StoreTargets(folder, cfg, changed, changed.images.device)
    report = verify_store(folder, samples=40)
    assert report["ok"] and not report["changed_samples"] and not report["disagreeing"]
    rewritten = np.frombuffer((folder / "epoch_0001.bin").read_bytes(), dtype=np.uint8)
    assert not np.array_equal(rewritten, np.frombuffer(original, dtype=np.uint8))  # the changed sample's records are new


def test_verify_names_the_samples_whose_stored_top1_disagrees(tmp_path, tiny_teacher):
    root = digits_folder(tmp_path / "data")
    cfg = folder_cfg(tmp_path, tiny_teacher, root)
    folder = write_store(cfg)
    from vitdistill.targets.store_format import Manifest

    manifest = Manifest.read(folder)
    records = np.memmap(folder / "epoch_0000.bin", dtype=manifest.dtype, mode="r+", shape=(manifest.records,))
    records["ids"][5] = np.roll(records["ids"][5], 1)  # sample 5's top-1 is now another class
    records.flush()
    del records
    from vitdistill.targets.offline import file_sha256

    manifest.epochs["0"]["sha256"] = file_sha256(folder / "epoch_0000.bin")  # a consistent store with a wrong record
    manifest.write(folder)
    report = verify_store(folder, samples=40, epochs=[0])
    name = open_source(cfg.data, "train").sample_name(5)
    assert not report["ok"] and report["disagreeing"] == [f"epoch 0: {name}"]


@pytest.mark.parametrize("damage", ['{"format": "vitdistill-teacher-st', "[1, 2]", '{"format": "vitdistill-teacher-store/1"}'])
def test_a_corrupt_manifest_names_the_file_and_the_repair_and_cache_rewrites_it(tmp_path, tiny_teacher, capsys, damage):
    cfg = load_recipe(
        "demo_student_distilled",
        tiny_run(
            tmp_path / "run",
            f"teacher.checkpoint={tiny_teacher}",
            f"store.path={tmp_path / 'store'}",
            "store.k=3",
            "store.epochs=1",
            "optim.epochs=1",
        ),
    )
    folder = write_store(cfg)
    good = (folder / "epoch_0000.bin").read_bytes()
    (folder / "manifest.json").write_text(damage)
    student = load_recipe(
        "demo_student_distilled", tiny_run(tmp_path / "run", f"teacher.store={folder}", "teacher.checkpoint=null", "optim.epochs=1")
    )
    source = open_source(student.data, "train", student.data.train_limit)
    with pytest.raises(
        UserError, match=r"manifest.json is corrupt \(.*\); rerun `vitdistill cache` with its recipe to write it again \(or delete"
    ):
        StoreTargets(folder, student, source, source.images.device)
    capsys.readouterr()
    write_store(cfg)
    assert "manifest.json is corrupt; writing the store again" in capsys.readouterr().out
    assert (folder / "epoch_0000.bin").read_bytes() == good
    StoreTargets(folder, student, source, source.images.device)
