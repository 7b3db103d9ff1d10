"""Teacher stores: format, replay identity, integrity, resume, verify, training from a store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from safetensors.torch import load_file

from vitdistill import UserError, load_recipe, train
from vitdistill.augment import Augmenter
from vitdistill.cli import main
from vitdistill.data import open_source
from vitdistill.store import Manifest, verify_store, write_store
from vitdistill.store import writer as writer_module
from vitdistill.targets import build_online_teacher
from vitdistill.targets.store import StoreTargets
from vitdistill.targets.store_format import dense_from_topk, record_dtype

# Views with every kind of randomness: crops, flips, RandAugment, erasing, mixup and cutmix.
VIEWS = ["augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0", "augment.rand_augment=rand-m9-mstd0.5-inc1", "augment.erase_prob=0.25"]


def cache_cfg(tmp_path, teacher, *extra):
    return load_recipe(
        "demo_student_distilled",
        tiny_run(
            tmp_path / "unused",
            *VIEWS,
            f"teacher.checkpoint={teacher}",
            f"store.path={tmp_path / 'store'}",
            "store.k=3",
            "store.epochs=2",
            *extra,
        ),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("store")
    cfg = cache_cfg(tmp, tiny_teacher)
    write_store(cfg)
    return tmp / "store", cfg


def test_record_format_and_dense_reconstruction():
    assert record_dtype(10, 1000).itemsize == 40  # TinyViT's format takes 44
    assert record_dtype(10, 40000).itemsize == 60  # int32 ids past 32,767 classes
    ids = torch.tensor([[2, 0], [1, 3]])
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.2]], dtype=torch.float16)
    dense = dense_from_topk(ids, probs, 4)
    assert torch.allclose(dense[0], torch.tensor([0.3, 0.1, 0.5, 0.1]), atol=1e-3)  # remainder 0.2 over 2 classes
    assert torch.allclose(dense[1], torch.tensor([0.0, 0.9, 0.0, 0.2]), atol=1e-3)  # over-full: clamped at 0
    full = dense_from_topk(torch.tensor([[1, 0]]), torch.tensor([[0.7, 0.3]]), 2)
    assert torch.allclose(full, torch.tensor([[0.3, 0.7]]))


def test_store_round_trip(store):
    folder, cfg = store
    manifest = Manifest.read(folder)
    assert manifest.complete_epochs() == [0, 1] and manifest.k == 3 and manifest.count == 256
    assert manifest.record_bytes == 12 and (folder / "epoch_0000.bin").stat().st_size == 256 * 12
    records = np.memmap(folder / "epoch_0001.bin", dtype=manifest.dtype, mode="r")
    assert (np.diff(records["probs"].astype(np.float32), axis=1) <= 0).all()  # top-k in order
    assert records["ids"].min() >= 0 and records["ids"].max() < 10
    assert not list(folder.glob("*.tmp"))


def test_stored_targets_replay_the_online_teacher_on_any_batch(store, tiny_teacher):
    folder, cfg = store
    source = open_source(cfg.data, "train", cfg.data.train_limit)
    views = Augmenter(source, cfg.augment, cfg.seed, cfg.data.mean, cfg.data.std, torch.device("cpu"))
    teacher = build_online_teacher(cfg.teacher, source, cfg.data.mean, cfg.data.std)
    targets = StoreTargets(
        folder,
        load_recipe("demo_student_distilled", tiny_run(folder / "x", *VIEWS, f"teacher.store={folder}", "teacher.checkpoint=null")),
        source,
        torch.device("cpu"),
    )
    for epoch, index in ((0, torch.tensor([5, 200, 17, 3])), (1, torch.arange(100, 140))):
        batch = views.train_batch(index, epoch)  # another batch composition than when caching
        online = torch.softmax(teacher(batch).logits, dim=1)
        stored = targets(batch).probs
        ids = stored.topk(3, dim=1).indices
        assert torch.equal(ids[:, 0], online.argmax(dim=1))
        assert torch.allclose(stored.gather(1, ids), online.gather(1, ids), atol=1e-3)  # fp16 rounding
        assert torch.allclose(stored.sum(dim=1), torch.ones(len(index)), atol=2e-3)


def test_a_store_made_for_other_views_data_seed_k_or_teacher_is_refused(store, tmp_path):
    folder, _ = store
    base = [*VIEWS, f"teacher.store={folder}", "teacher.checkpoint=null"]
    cases = [
        (["seed=1"], "seed 0, the run uses seed 1"),
        (["augment.hflip=0.3"], "augment.config.hflip"),
        (["data.std=[0.4, 0.4, 0.4]"], "augment.std"),
        (["data.train_limit=200"], "dataset.count"),
        (["teacher.k=5"], "k=3"),
        (["optim.epochs=3"], "the run needs 3"),
    ]
    for extra, words in cases:
        with pytest.raises(UserError, match=words.replace("(", r"\(")):
            train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "x", *base, *extra)))
    other = tmp_path / "other_teacher.safetensors"
    from vitdistill.config import ModelConfig
    from vitdistill.models import build_model, export_model

    export_model(build_model(ModelConfig(name="vitdistill_convnet_tiny"), 10), other)
    with pytest.raises(UserError, match="another teacher"):
        train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "x", *base, f"teacher.checkpoint={other}")))


def test_damaged_files_are_detected(store, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(store[0], folder)
    data = bytearray((folder / "epoch_0001.bin").read_bytes())
    data[100] ^= 0xFF
    (folder / "epoch_0001.bin").write_bytes(bytes(data))
    report = verify_store(folder, samples=16)
    assert not report["ok"] and report["checksum_failures"] == ["epoch_0001.bin"] and report["epochs_checked"] == [0]
    cfg = load_recipe(
        "demo_student_distilled", tiny_run(tmp_path / "x", *VIEWS, f"teacher.store={folder}", "teacher.checkpoint=null", "optim.epochs=2")
    )
    with pytest.raises(UserError, match="checksum"):
        train(cfg)
    (folder / "epoch_0000.bin").write_bytes(b"short")
    with pytest.raises(UserError, match="wrong size"):
        train(
            load_recipe(
                "demo_student_distilled",
                tiny_run(tmp_path / "y", *VIEWS, f"teacher.store={folder}", "teacher.checkpoint=null", "optim.epochs=1"),
            )
        )
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Manifest.read(folder)


def test_verify_agrees_with_the_teacher(store):
    report = verify_store(store[0], samples=64)
    assert report["ok"] and report["top1_agreement"] == 1.0 and report["max_prob_error"] < 1e-3
    assert report["epochs_checked"] == [0, 1]


def test_interrupted_cache_resumes_to_the_same_store(store, tiny_teacher, tmp_path, monkeypatch):
    cfg = cache_cfg(tmp_path, tiny_teacher)
    original, calls = writer_module.teacher_probs, {"n": 0}

    def crash_in_epoch_1(teacher, views, index, epoch, *args):
        if epoch == 1:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return original(teacher, views, index, epoch, *args)

    monkeypatch.setattr(writer_module, "teacher_probs", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        write_store(cfg)
    assert Manifest.read(tmp_path / "store").complete_epochs() == [0]
    # the partial epoch is not listed; its file and the note of the 2 batches written are kept for the next run
    assert sorted(p.name for p in (tmp_path / "store").glob("epoch_0001.bin*")) == ["epoch_0001.bin.partial", "epoch_0001.bin.partial.0of1"]
    assert (tmp_path / "store" / "epoch_0001.bin.partial.0of1").read_text() == "batch32 2"
    calls["n"] = 0

    def count(teacher, views, index, epoch, *args):
        calls["n"] += epoch == 1
        return original(teacher, views, index, epoch, *args)

    monkeypatch.setattr(writer_module, "teacher_probs", count)
    write_store(cfg)
    assert calls["n"] == 8 - 2  # the epoch continued at its third batch
    assert not [p.name for p in (tmp_path / "store").iterdir() if "partial" in p.name or ".tmp" in p.name]
    for name in ("epoch_0000.bin", "epoch_0001.bin"):
        assert (tmp_path / "store" / name).read_bytes() == (store[0] / name).read_bytes()
    assert Manifest.read(tmp_path / "store").epochs == Manifest.read(store[0]).epochs
    with pytest.raises(UserError, match="made differently"):
        write_store(cache_cfg(tmp_path, tiny_teacher, "store.k=4"))


def test_hard_distillation_from_the_store_equals_the_online_teacher(store, tiny_teacher, tmp_path):
    common = [*TINY_DEIT, *VIEWS]
    online = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "online", *common, f"teacher.checkpoint={tiny_teacher}")))
    stored = train(
        load_recipe(
            "demo_student_distilled",
            tiny_run(tmp_path / "stored", *common, f"teacher.store={store[0]}", f"teacher.checkpoint={tiny_teacher}"),
        )
    )
    a, b = load_file(str(online.output / "model.safetensors")), load_file(str(stored.output / "model.safetensors"))
    for key in a:  # argmax of the stored top-k == argmax of the online logits: the same run
        assert torch.equal(a[key], b[key]), key


def test_label_free_training_from_the_store_with_a_tiny_vit(store, tmp_path):
    result = train(
        load_recipe(
            "demo_student",
            tiny_run(
                tmp_path / "run",
                *VIEWS,
                f"teacher.store={store[0]}",
                "model.name=tiny_vit_5m_224",
                "model.img_size=8",
                "model.patch_size=null",
                "model.kwargs={}",
                "objective=[{term: kd_soft, tau: 1.0}]",
            ),
        )
    )
    first, last = result.history
    # the student moves towards the stored distributions (0.074 -> 0.032 when written); their argmax
    # is not yet informative: the 3-epoch teacher is nearly uniform on these heavily mixed views
    assert last["train_kd_soft"] < 0.6 * first["train_kd_soft"]
    assert set(first) & {"train_ce", "train_ce@cls"} == set()  # no label term


def test_cache_and_verify_from_the_command_line(tmp_path, tiny_teacher, capsys):
    args = tiny_run(
        tmp_path / "unused", f"teacher.checkpoint={tiny_teacher}", f"store.path={tmp_path / 's'}", "store.epochs=1", "store.k=0"
    )
    assert main(["cache", "demo_student_distilled", *args]) == 0
    out = capsys.readouterr().out
    assert "40 bytes per sample per epoch" in out  # k=0: all 10 classes, int16 + fp16
    assert main(["verify", str(tmp_path / "s"), "--samples", "32", "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["ok"]
    (tmp_path / "s" / "epoch_0000.bin").write_bytes(b"\0" * (256 * 40))
    assert main(["verify", str(tmp_path / "s"), "--samples", "32"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
