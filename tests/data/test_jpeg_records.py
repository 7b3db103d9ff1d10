"""JPEG records (issue 17): images resized once like raw records, stored as JPEG in bounded
shards, decoded per batch into the same zero-padded records; exact views, resumable builds,
corrupt images, the decoder in the fingerprint, and the disk check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import photo_crops

from vitdistill.augment import Augmenter
from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import jpeg, open_source, records
from vitdistill.errors import UserError


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for split, count in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
        for i, img in enumerate(photo_crops(count, seed=len(split))):
            img.save(root / split / "ab"[i % 2] / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root


def cfg(root, tmp_path, **kw) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), source_size=40, decoder="cpu", **kw)


def test_jpeg_records_decode_to_records_of_the_same_shape_and_sizes(photos, tmp_path):
    raw = open_source(cfg(photos, tmp_path, records="raw"), "train")
    comp = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    assert isinstance(comp.images, jpeg.JpegRecords) and isinstance(raw.images, torch.Tensor)
    assert comp.image_size == raw.image_size == (40, 53) and torch.equal(comp.sizes, raw.sizes)
    assert comp.items_hash == raw.items_hash and len(comp) == len(raw) == 12
    decoded = comp.images[torch.arange(12)]
    assert decoded.dtype == torch.uint8 and decoded.shape == raw.images.shape
    for i, (h, w, t) in enumerate(comp.sizes.tolist()):
        rows, cols = (w, h) if t else (h, w)
        assert (decoded[i, rows:] == 0).all() and (decoded[i, :, cols:] == 0).all()  # padding stays zero
        # lossy, but close to the raw pixels (quality 90 on small photographs: a few levels; a misplaced image: ~60)
        assert (decoded[i, :rows, :cols].float() - raw.images[i, :rows, :cols].float()).abs().mean() < 8


def test_views_from_jpeg_records_equal_views_from_raw_records_of_the_same_pixels(photos, tmp_path):
    comp = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    pixels = comp.images[torch.arange(len(comp))]
    same = dataclasses.replace(comp, images=pixels, memory_mapped=False)  # raw records of the decoded pixels
    aug = AugmentConfig(input_size=16, mixup_alpha=0.8, cutmix_alpha=1.0, rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.25)
    a = Augmenter(comp, aug, 0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"), workers=2)
    b = Augmenter(same, aug, 0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"))
    assert not a.on_device and b.on_device  # the JPEG path is read ahead by threads
    steps = [torch.tensor([3, 7, 0, 11]), torch.tensor([5, 1, 2, 9])]
    for x, y in zip(a.train_batches(steps, 1), b.train_batches(steps, 1)):
        assert torch.equal(x.images, y.images) and torch.equal(x.boxes, y.boxes)
    assert torch.equal(a.eval_batch(torch.arange(4)).images, b.eval_batch(torch.arange(4)).images)


KILL_MIDWAY = """
import os, signal, sys
from vitdistill.data import jpeg
from vitdistill.data.decoded import RecordShape
jpeg.CHUNK = 3
calls = {"n": 0}
encode = jpeg._encode
def dying(args):
    calls["n"] += 1
    if calls["n"] == 8:  # in the third shard: two finished, one half-written
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(args)
jpeg._encode = dying
paths = sys.argv[2:]
jpeg.build_jpeg_records(paths, RecordShape(40), __import__("pathlib").Path(sys.argv[1]), "test")
"""


def test_a_build_killed_midway_resumes_with_its_finished_shards(photos, tmp_path, monkeypatch):
    import subprocess
    import sys

    from vitdistill.data.decoded import RecordShape

    paths = sorted(str(p) for p in (photos / "train").rglob("*.*"))
    folder = tmp_path / "rec"
    killed = subprocess.run([sys.executable, "-c", KILL_MIDWAY, str(folder), *paths], capture_output=True, check=False)
    assert killed.returncode == -9
    partial = jpeg.partial_folder(folder)
    assert not folder.exists() and sorted(p.name for p in partial.glob("*.idx.npy")) == ["00000.idx.npy", "00001.idx.npy"]
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.jpgs")}
    monkeypatch.setattr(jpeg, "CHUNK", 3)
    encoded = []
    monkeypatch.setattr(jpeg, "_encode", lambda args, real=jpeg._encode: encoded.append(args[0]) or real(args))
    jpeg.build_jpeg_records(paths, RecordShape(40), folder, "test")
    assert encoded == paths[6:]  # the two finished shards are not encoded again
    assert not partial.exists() and not list(folder.glob("*.tmp*")) and not list(folder.glob("*.idx.npy"))
    assert {n: (folder / n).stat().st_mtime_ns for n in ("00000.jpgs", "00001.jpgs")} == {n: kept[n] for n in ("00000.jpgs", "00001.jpgs")}
    resumed = jpeg.JpegRecords(folder)
    monkeypatch.undo()
    whole = tmp_path / "whole"
    jpeg.build_jpeg_records(paths, RecordShape(40), whole, "test")
    assert torch.equal(resumed[torch.arange(12)], jpeg.JpegRecords(whole)[torch.arange(12)])
    assert json.loads((folder / "records.json").read_text())["shards"] == 4 and resumed.index[:, 0].tolist() == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
        3,
        3,
        3,
    ]


def test_corrupt_images_stop_the_build_or_are_left_out(photos, tmp_path):
    broken = photos / "train" / "a" / "004.png"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot decode .*004.png.*data.on_corrupt=skip"):
        open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    source = open_source(cfg(photos, tmp_path, records="jpeg", on_corrupt="skip"), "train")
    assert len(source) == 11 and [p.rsplit("/", 1)[-1] for p in source.skipped["corrupt"]] == ["004.png"]
    raw = open_source(cfg(photos, tmp_path, records="raw", on_corrupt="skip"), "train")
    assert source.items_hash == raw.items_hash and torch.equal(source.sizes, raw.sizes)
    with pytest.raises(UserError, match="cannot decode .*004.png"):  # the cached records do not hide it from a run that wants all
        open_source(cfg(photos, tmp_path, records="jpeg"), "train")


def test_the_decoder_is_in_the_fingerprint_and_another_one_is_refused(photos, tmp_path):
    from vitdistill.targets.offline import first_difference

    source = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    mine = source.fingerprint()
    assert mine["decoder"]["library"] == "pillow" and mine["decoder"]["device"] == "cpu" and mine["decoder"]["quality"] == 90
    source.images.decoder_device = "cuda"  # the same records replayed through nvJPEG
    assert first_difference(mine, source.fingerprint(), "dataset.").startswith("dataset.decoder.")
    raw = open_source(cfg(photos, tmp_path, records="raw"), "train")
    assert "decoder" not in raw.fingerprint() and first_difference(mine, raw.fingerprint(), "dataset.").startswith("dataset.decoder")


def test_the_gpu_decoder_path_lays_out_the_same_records(photos, tmp_path):
    """The batched torchvision call (nvJPEG on CUDA) run on the CPU: same records, and its
    deprecation notice never reaches the user."""
    import warnings

    source = open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    index = torch.tensor([4, 1, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = source.images.gather(index, pin=False)
        assert isinstance(batch, torch.Tensor)
        source.images.decoder_device = "cuda"
        encoded = source.images.gather(index, pin=False)
        assert isinstance(encoded, jpeg.EncodedBatch)
        other = encoded.to(torch.device("cpu"))
    assert other.shape == batch.shape and ((other.int() - batch.int()).abs() <= 2).all()  # two libjpeg builds: at most rounding apart


def test_disk_check_and_auto_choice(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(records, "free_bytes", lambda folder: 10_000)
    with pytest.raises(
        UserError, match=r"raw\) records need about .* which has 0.0 MB free; set data.records=jpeg .*data.source_size.*data.cache_dir"
    ):
        open_source(cfg(photos, tmp_path, records="raw"), "train")
    with pytest.raises(UserError, match="JPEG records need about .*lower data.jpeg_quality"):
        open_source(cfg(photos, tmp_path, records="jpeg"), "train")
    assert not (tmp_path / "cache" / "decoded").exists() or not any((tmp_path / "cache" / "decoded").iterdir())  # nothing written
    monkeypatch.setattr(records, "free_bytes", lambda folder: 10**12)
    small = open_source(cfg(photos, tmp_path), "train")
    assert isinstance(small.images, torch.Tensor) and "data.records=auto: raw records for 12 images" in capsys.readouterr().out
    monkeypatch.setattr(records, "AUTO_RAW_BYTES", 1000)
    big = open_source(cfg(photos, tmp_path), "test")
    assert (
        isinstance(big.images, jpeg.JpegRecords) and "data.records=auto: JPEG records (quality 90) for 4 images" in capsys.readouterr().out
    )
    again = open_source(cfg(photos, tmp_path), "train")  # auto reads what is cached
    assert isinstance(again.images, torch.Tensor) and capsys.readouterr().out == ""


def test_a_run_trains_and_evaluates_from_jpeg_records(photos, tmp_path):
    from conftest import TINY_DEIT, tiny_run

    from vitdistill import load_recipe, train

    data = [
        f"data.root={photos}",
        "data.source=imagefolder",
        "data.source_size=16",
        "data.records=jpeg",
        "data.decoder=cpu",
        "data.train_limit=null",
        "data.eval_limit=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "optim.batch_size=4",
        "augment.input_size=8",
    ]
    result = train(load_recipe("demo_student", tiny_run(tmp_path / "run", *data, *TINY_DEIT)))
    assert [row["train_steps"] for row in result.history] == [3, 3] and 0 <= result.history[-1]["eval_top1"] <= 100
    assert list((tmp_path / "cache" / "decoded").glob("*.jpeg90/00000.jpgs")) and not list((tmp_path / "cache" / "decoded").glob("*.npy"))


def test_a_store_made_with_one_decoder_is_refused_by_a_run_that_decodes_with_another(tmp_path, tiny_teacher, monkeypatch):
    from conftest import TINY_DEIT, tiny_run

    from vitdistill import load_recipe, train
    from vitdistill.store import write_store

    root = tmp_path / "photos"
    for split in ("train", "test"):
        for i, img in enumerate(photo_crops(20, seed=len(split))):  # the digits teacher's ten classes
            (root / split / f"{i % 10}").mkdir(parents=True, exist_ok=True)
            img.save(root / split / f"{i % 10}" / f"{i}.jpg")
    data = [
        f"data.root={root}",
        "data.source=imagefolder",
        "data.source_size=12",
        "data.records=jpeg",
        "data.train_limit=null",
        "data.eval_limit=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "optim.batch_size=4",
        "augment.input_size=8",
        *TINY_DEIT,
    ]
    store = tmp_path / "store"
    write_store(
        load_recipe(
            "demo_student_distilled",
            tiny_run(
                tmp_path / "u", *data, "data.decoder=cpu", f"teacher.checkpoint={tiny_teacher}", f"store.path={store}", "store.epochs=1"
            ),
        )
    )
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["dataset"]["decoder"]["library"] == "pillow"
    with monkeypatch.context() as patch:  # a longer store on a full disk: refused before its first epoch
        patch.setattr(records, "free_bytes", lambda folder: 100)
        with pytest.raises(
            UserError, match=r"^store.path: the 2 epochs left of the store need about .* which has 0.0 MB free; lower store.k"
        ):
            write_store(
                load_recipe(
                    "demo_student_distilled",
                    tiny_run(
                        tmp_path / "u",
                        *data,
                        "data.decoder=cpu",
                        f"teacher.checkpoint={tiny_teacher}",
                        f"store.path={store}",
                        "store.epochs=3",
                    ),
                )
            )
    assert sorted(p.name for p in store.glob("epoch_*")) == ["epoch_0000.bin"]
    replay = [*data, f"teacher.checkpoint={tiny_teacher}", f"teacher.store={store}", "optim.epochs=1"]
    with pytest.raises(UserError, match=r"^teacher.store: .* other data: dataset.decoder.device \('cpu' in the store, 'cuda' now\)$"):
        train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "r", *replay, "data.decoder=cuda")))
    assert train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "s", *replay, "data.decoder=cpu"))).history
