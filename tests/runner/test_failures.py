"""When things go wrong: each case of issue 9 reproduced, and what the user gets instead of a
traceback or lost work (README, "When things go wrong")."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from PIL import Image
from safetensors.torch import load_file

from vitdistill import ConfigError, UserError, load_recipe, train
from vitdistill.cli import main
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.engine.guard import TrainingDiverged
from vitdistill.objective import classification
from vitdistill.store import Manifest, write_store

CONVNET = "model.name=vitdistill_convnet_tiny"


def nonfinite(state: dict) -> int:
    return sum(int((~torch.isfinite(v)).sum()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def make_imagefolder(root: Path, classes=("a", "b", "c"), per_class=12, size=(32, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def folder_run(tmp_path, root, *extra):
    return load_recipe(
        "demo_teacher",
        tiny_run(
            tmp_path / "run",
            CONVNET,
            "data.source=imagefolder",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.train_limit=null",
            "data.eval_limit=null",
            "augment.input_size=32",
            "optim.batch_size=8",
            "optim.epochs=1",
            *extra,
        ),
    )


# ------------------------------------------------------------------ 1. divergence
def nan_in_epoch(monkeypatch, epoch: int) -> None:
    """The `ce` term returns NaN from the given (0-based) epoch on."""
    original = classification.CrossEntropy.forward

    def forward(self, out, batch, teacher):
        value = original(self, out, batch, teacher)
        return value * float("nan") if batch.epoch >= epoch else value

    monkeypatch.setattr(classification.CrossEntropy, "forward", forward)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    nan_in_epoch(monkeypatch, 1)
    cfg = load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "optim.epochs=3"))
    with pytest.raises(TrainingDiverged, match=r"epoch 2 at step 1 \(loss nan\).*keeps epoch 1"):
        train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and nonfinite(state["model"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))) == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.undo()
    resumed = train(cfg, resume=True)  # continues from the good epoch
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert nonfinite(load_file(str(tmp_path / "run" / "model.safetensors"))) == 0


def test_non_finite_weights_with_a_finite_loss_are_never_saved(tmp_path, monkeypatch):
    from vitdistill.engine import trainer as trainer_module

    original = trainer_module.Trainer.train_epoch

    def poison_in_second_epoch(self, epoch, bar):
        stats = original(self, epoch, bar)
        if epoch == 1:
            with torch.no_grad():
                next(self.model.parameters())[0].fill_(float("inf"))  # the loss of this epoch was finite
        return stats

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", poison_in_second_epoch)
    with pytest.raises(TrainingDiverged, match="epoch 2: the weights hold .* non-finite values"):
        train(load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "optim.epochs=3")))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and nonfinite(state["model"]) == 0


def test_the_reported_divergence_exits_with_one_line_and_saves_nothing_non_finite(tmp_path, capsys):
    """The issue's own command, on 36 random 32x32 images in 3 classes (losses stayed finite)."""
    root = make_imagefolder(tmp_path / "random")
    args = [
        "train",
        "demo_teacher",
        "optim.lr=1000",
        "optim.epochs=4",
        "optim.warmup_epochs=2",
        "optim.warmup_lr=1e-6",
        f"output={tmp_path / 'x'}",
        "data.source=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "augment.input_size=32",
        "optim.batch_size=8",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged" in err
    for name in ("checkpoint.pt", "model.safetensors"):
        path = tmp_path / "x" / name
        if path.exists():
            state = torch.load(path, weights_only=False)["model"] if name.endswith(".pt") else load_file(str(path))
            assert nonfinite(state) == 0, name


def test_skip_step_policy_skips_and_counts_the_bad_update(tmp_path, monkeypatch):
    original = classification.CrossEntropy.forward
    calls = {"n": 0}

    def one_nan(self, out, batch, teacher):
        calls["n"] += 1
        value = original(self, out, batch, teacher)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(classification.CrossEntropy, "forward", one_nan)
    result = train(load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "engine.nan_policy=skip_step")))
    assert [row["train_skipped_steps"] for row in result.history] == [1, 0]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert nonfinite(load_file(str(result.output / "model.safetensors"))) == 0
    calls["n"] = 0
    with pytest.raises(TrainingDiverged, match="1 steps with a non-finite loss"):
        train(
            load_recipe("demo_teacher", tiny_run(tmp_path / "strict", CONVNET, "engine.nan_policy=skip_step", "engine.max_skipped_steps=0"))
        )


# ------------------------------------------------------------------ 2. bad data
def test_a_corrupt_image_is_named_and_leaves_no_temporary_files(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    assert (
        main(
            [
                "train",
                "demo_teacher",
                *tiny_run(tmp_path / "run", CONVNET),
                "data.source=imagefolder",
                f"data.root={root}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.train_limit=null",
                "augment.input_size=32",
                "optim.batch_size=8",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "data.on_corrupt=skip" in err
    assert not list((tmp_path / "cache").rglob("*tmp*"))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_skipped_corrupt_images_and_non_images_are_counted(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(b"not an image at all")
    (root / "train" / "a" / "notes.txt").write_text("labels were checked by hand")
    result = train(folder_run(tmp_path, root, "data.on_corrupt=skip"))
    summary = json.loads((result.output / "summary.json").read_text())
    skipped = summary["skipped_files"]["imagefolder:data/train"]
    assert skipped == {"not_image": ["a/notes.txt"], "corrupt": [str(bad)]}
    source = open_source(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), on_corrupt="skip"), "train")
    assert len(source) == 35 and source.labels.tolist() == [0] * 12 + [1] * 11 + [2] * 12  # b/3.png left out, order kept
    order = sorted(p.name for p in (root / "train" / "b").iterdir())  # 0, 1, 10, 11, 2, 3, 4, ...
    position = 12 + order.index("3.png")
    expected = np.asarray(Image.open(root / "train" / "b" / order[order.index("3.png") + 1]).convert("RGB"))
    assert np.array_equal(source.images[position].numpy(), expected)  # the next file moved up to b/3.png's place
    with pytest.raises(UserError, match="3.png"):  # the cached result does not hide it from a strict run
        open_source(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache")), "train")


def test_a_truncated_archive_is_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="data")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert (
        main(
            [
                "train",
                "demo_teacher",
                *tiny_run(tmp_path / "run", CONVNET),
                "data.source=imagefolder",
                f"data.root={archive}",
                f"data.cache_dir={tmp_path / 'cache'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged or incomplete" in err and str(archive) in err
    assert not list((tmp_path / "cache" / "archives").iterdir())


# ------------------------------------------------------------------ 3. edited images
def test_an_edited_image_is_decoded_again(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    cfg = DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"))
    before = open_source(cfg, "train")
    target = root / "train" / "a" / "0.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    after = open_source(cfg, "train")
    assert not np.array_equal(before.images[0].numpy(), after.images[0].numpy())
    assert (after.images[0].numpy() == [255, 0, 0]).all()
    assert np.array_equal(before.images[1:].numpy(), after.images[1:].numpy())


# ------------------------------------------------------------------ 4. store repair
def test_cache_rewrites_damaged_and_missing_epochs_and_training_checks_them_first(tmp_path, tiny_teacher, capsys):
    args = tiny_run(
        tmp_path / "unused", f"teacher.checkpoint={tiny_teacher}", f"store.path={tmp_path / 'store'}", "store.epochs=3", "store.k=3"
    )
    cfg = load_recipe("demo_student_distilled", args)
    write_store(cfg)
    folder = tmp_path / "store"
    original = {name: (folder / name).read_bytes() for name in ("epoch_0000.bin", "epoch_0001.bin", "epoch_0002.bin")}
    data = bytearray(original["epoch_0001.bin"])
    data[5] ^= 0xFF
    (folder / "epoch_0001.bin").write_bytes(bytes(data))
    (folder / "epoch_0002.bin").unlink()

    student = load_recipe(
        "demo_student_distilled",
        tiny_run(tmp_path / "student", *TINY_DEIT, f"teacher.store={folder}", f"teacher.checkpoint={tiny_teacher}", "optim.epochs=3"),
    )
    with pytest.raises(UserError, match="2 epoch files are damaged or missing"):
        train(student)
    assert not (tmp_path / "student" / "checkpoint.pt").exists()  # refused at start-up, not in epoch 2

    capsys.readouterr()
    write_store(cfg)
    out = capsys.readouterr().out
    assert "epoch 2: epoch_0001.bin does not match its checksum; rewriting it" in out
    assert "epoch 3: epoch_0002.bin is missing; rewriting it" in out
    assert {name: (folder / name).read_bytes() for name in original} == original  # byte-identical again
    assert Manifest.read(folder).complete_epochs() == [0, 1, 2]
    assert len(train(student).history) == 3


# ------------------------------------------------------------------ 5. values that used to fail late
@pytest.mark.parametrize(
    "override, key",
    [
        ("engine.device=gpu", "engine.device"),
        ("optim.opt=adamx", "optim.opt"),
        ("model.name=resnet81", "model.name"),
        ("teacher={name: deit_tinyy, weights: t.pth}", "teacher.name"),
        ("augment.rand_augment=rand-m9-x", "augment.rand_augment"),
    ],
)
def test_values_that_crashed_late_fail_at_config_time(override, key, capsys):
    assert main(["config", "demo_student_distilled", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vitdistill: error: {key}: ")


def test_a_view_size_the_model_cannot_take_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="augment.input_size: 16x16 views, but .* takes 8x8"):
        train(load_recipe("demo_student", tiny_run(tmp_path / "run", *TINY_DEIT, "augment.input_size=16")))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 6. damaged checkpoint
def test_a_damaged_checkpoint_is_one_line_for_resume_and_eval(tmp_path, capsys):
    args = ["train", "demo_teacher", *tiny_run(tmp_path / "run", CONVNET, "optim.epochs=1")]
    assert main(args) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()
    for command in (args + ["--resume"], ["eval", str(checkpoint)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "damaged or truncated" in err and str(checkpoint) in err
    export = tmp_path / "run" / "model.safetensors"
    export.write_bytes(export.read_bytes()[:50])
    assert main(["eval", str(export)]) == 2
    assert "damaged or truncated" in capsys.readouterr().err


# ------------------------------------------------------------------ 7. resume refuses before decoding
def test_resume_compares_the_recipe_before_opening_the_data(tmp_path, monkeypatch):
    train(load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "optim.epochs=1")))
    from vitdistill import runner

    def no_data(*args, **kwargs):
        raise AssertionError("the data was opened before the recipe was compared")

    monkeypatch.setattr(runner, "open_splits", no_data)
    with pytest.raises(UserError, match="optim.lr"):
        train(load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "optim.epochs=2", "optim.lr=0.5")), resume=True)


# ------------------------------------------------------------------ 8. empty class folders
def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    for split in ("train", "test"):
        (root / split / "d_empty").mkdir()
    with pytest.raises(UserError, match="d_empty has no images.*allow_empty_classes"):
        train(folder_run(tmp_path, root))
    source = open_source(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), allow_empty_classes=True), "train")
    assert source.classes == ["a", "b", "c", "d_empty"] and len(source) == 36


# ------------------------------------------------------------------ 9. smaller items
def test_run_files_are_readable_and_paths_absolute_so_eval_works_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "data")
    result = train(
        load_recipe(
            "demo_teacher",
            tiny_run(
                Path("runs/x"),
                CONVNET,
                "data.source=imagefolder",
                "data.root=data",
                "data.cache_dir=cache",
                "data.train_limit=null",
                "augment.input_size=32",
                "optim.batch_size=8",
                "optim.epochs=1",
            ),
        )
    )
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "checkpoint.pt", "config.yaml", "metrics.csv"):
        assert (result.output / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    recipe = (result.output / "config.yaml").read_text()
    assert f"root: {tmp_path / 'data'}" in recipe and f"cache_dir: {tmp_path / 'cache'}" in recipe
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(tmp_path / "runs" / "x")]) == 0


def test_a_batch_larger_than_the_data_is_refused_before_any_file_is_written(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size: 512 is larger than the 256 training images"):
        train(load_recipe("demo_teacher", tiny_run(tmp_path / "run", CONVNET, "optim.batch_size=512")))
    assert not (tmp_path / "run").exists()


def test_a_crop_setting_that_does_nothing_warns_in_one_line(capsys):
    assert main(["config", "deit_tiny_distilled_cifar10", "augment.scale=[0.35,1.0]"]) == 0
    err = capsys.readouterr().err
    assert err == "vitdistill: warning: augment.scale has no effect with augment.crop=pad (it applies to crop: rrc)\n"


def test_a_closed_pipe_ends_quietly():
    process = subprocess.Popen([sys.executable, "-m", "vitdistill", "recipes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    err = process.stderr.read().decode()
    process.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_bench_gpu_refuses_missing_data_before_any_stage_runs(tmp_path, capsys):
    assert main(["bench", "gpu", "--data", str(tmp_path / "missing.tar.gz"), "--budget", "1m", "--output", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vitdistill: error: bench gpu: --data {tmp_path / 'missing.tar.gz'} does not exist"]
    assert not (tmp_path / "bench").exists()  # no stage started, no report written
