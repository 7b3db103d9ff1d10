"""Two short epochs on a slice of the shared CIFAR-10 JPEG set (skipped when it is absent)."""

from __future__ import annotations

import numpy as np
from conftest import CACHE
from PIL import Image

from vitdistill import load_recipe, train
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.data.imagefolder import resolve_split_dir, unpack_archive

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_imagefolder_slice_decodes_the_jpegs(cifar_archive):
    cfg = DataConfig(source="imagefolder", root=str(cifar_archive), cache_dir=str(CACHE))
    source = open_source(cfg, "train", limit=200)
    assert source.classes == CLASSES and len(source) == 200 and source.image_size == (32, 32)
    assert np.bincount(source.labels.numpy()).tolist() == [20] * 10  # class-balanced slice
    assert source.labels.tolist() == sorted(source.labels.tolist())  # stable sorted-file order
    # sample 0 is the first file of the first class; pixels match a direct decode
    split_dir = resolve_split_dir(unpack_archive(cifar_archive, CACHE), "train")
    first = sorted((split_dir / "airplane").iterdir())[0]
    assert np.array_equal(source.images[0].numpy(), np.asarray(Image.open(first).convert("RGB")))
    again = open_source(cfg, "train", limit=200)  # from the decoded cache
    assert again.items_hash == source.items_hash and np.array_equal(again.images.numpy(), source.images.numpy())


def test_teacher_then_distilled_deit_two_epochs_each(cifar_archive, tmp_path):
    data = [
        f"data.root={cifar_archive}",
        f"data.cache_dir={CACHE}",
        "data.train_limit=512",
        "data.eval_limit=200",
        "optim.epochs=2",
        "optim.batch_size=64",
        "engine.device=cpu",
    ]
    teacher = train(
        load_recipe(
            "cnn_teacher_cifar10",
            [*data, f"output={tmp_path / 'teacher'}", "model.name=vitdistill_convnet_tiny", "model.small_input_stem=false"],
        )
    )
    first, last = teacher.history
    assert last["train_loss"] < first["train_loss"] and last["eval_top1"] > 12.0  # chance: 10% (18.0 when written)
    student = train(
        load_recipe(
            "deit_tiny_distilled_cifar10",
            [
                *data,
                f"output={tmp_path / 'student'}",
                f"teacher.checkpoint={teacher.output}",
                "model.kwargs={embed_dim: 64, depth: 2, num_heads: 2}",
            ],
        )
    )
    first, last = student.history
    assert {"eval_top1_cls", "eval_top1_dist", "train_kd_hard@dist"} <= set(last)
    assert last["train_kd_hard@dist"] < first["train_kd_hard@dist"] and last["train_ce@cls"] < first["train_ce@cls"]
    assert last["train_img_per_s"] > 0
