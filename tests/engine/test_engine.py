"""The loop: determinism, resume == uninterrupted, atomic outputs, the teacher kept out."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import TINY_DEIT, interrupted_at_epoch, tiny_run
from safetensors.torch import load_file

from vitdistill import UserError, evaluate_checkpoint, load_recipe, train
from vitdistill.augment import Augmenter
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.engine import trainer as trainer_module
from vitdistill.models import load_model


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = train(load_recipe("demo_student", tiny_run(tmp_path / name, f"seed={seed}", "optim.epochs=1")))
        runs[name] = result.output / "model.safetensors"
    assert_same_weights(runs["a"], runs["b"])
    wa, wc = weights(runs["a"]), weights(runs["c"])
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_teacher):
    overrides = [
        *TINY_DEIT,
        "model.drop_path=0.1",
        "augment.mixup_alpha=0.8",
        "augment.cutmix_alpha=1.0",
        f"teacher.checkpoint={tiny_teacher}",
        "optim.epochs=3",
        "engine.ema_decay=0.9",
    ]
    straight = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "straight", *overrides)))

    with interrupted_at_epoch(2), pytest.raises(KeyboardInterrupt):
        train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "resumed", *overrides)))
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1

    resumed = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "resumed", *overrides)), resume=True)
    assert_same_weights(straight.output / "model.safetensors", resumed.output / "model.safetensors")
    assert_same_weights(straight.output / "model_ema.safetensors", resumed.output / "model_ema.safetensors")  # the EMA is restored too
    keys = ["epoch", "train_loss", "eval_top1", "eval_top1_cls", "eval_top1_dist", "ema_top1"]
    assert [[row[k] for k in keys] for row in straight.history] == [[row[k] for k in keys] for row in resumed.history]
    rows = list(csv.DictReader(open(resumed.output / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_outputs_checkpoint_and_the_teacher_never_saved(tmp_path, tiny_teacher):
    result = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "run", *TINY_DEIT, f"teacher.checkpoint={tiny_teacher}")))
    out = result.output
    for name in ("checkpoint.pt", "model.safetensors", "metrics.csv", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    teacher_keys = set(weights(tiny_teacher))
    student_keys = set(weights(out / "model.safetensors"))
    assert all(k.startswith("backbone.") for k in state["model"])
    assert {k.removeprefix("backbone.") for k in state["model"]} == student_keys
    assert not {k for k in student_keys if k.startswith("features.")}  # nothing of the CNN teacher
    assert teacher_keys - student_keys == {k for k in teacher_keys if k.startswith("features.")}
    assert "dist_token" in student_keys and "head_dist.weight" in student_keys
    blob = open(out / "checkpoint.pt", "rb").read()
    assert b"features.0.0.weight" not in blob  # the teacher's first conv, by name
    header = next(csv.reader(open(out / "metrics.csv")))
    for column in (
        "epoch",
        "train_loss",
        "train_ce@cls",
        "train_kd_hard@dist",
        "lr",
        "eval_top1",
        "eval_top1_cls",
        "eval_top1_dist",
        "eval_top1_mean",
        "eval_top5",
        "train_img_per_s",
    ):
        assert column in header, column
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["final"]["eval_top1"] == result.final["eval_top1"]


def test_inference_head_is_the_mean_of_the_heads(tmp_path, tiny_teacher):
    result = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "run", *TINY_DEIT, f"teacher.checkpoint={tiny_teacher}")))
    model = load_model(result.output)
    views = Augmenter(
        open_source(DataConfig(source="digits"), "test", 128),
        load_recipe("demo_student_distilled").augment,
        0,
        (0.5,) * 3,
        (0.5,) * 3,
        torch.device("cpu"),
    )
    batch = views.eval_batch(torch.arange(128))
    with torch.no_grad():  # both heads by hand, from the backbone's tokens
        net = model.backbone
        tokens = net.forward_features(batch.images)
        cls, dist = net.head(tokens[:, 0]), net.head_dist(tokens[:, 1])
    mean_top1 = 100.0 * ((cls + dist) / 2).argmax(1).eq(batch.labels).float().mean().item()
    cls_top1 = 100.0 * cls.argmax(1).eq(batch.labels).float().mean().item()
    dist_top1 = 100.0 * dist.argmax(1).eq(batch.labels).float().mean().item()
    assert result.final["eval_top1"] == pytest.approx(mean_top1) and result.final["eval_top1_mean"] == pytest.approx(mean_top1)
    assert result.final["eval_top1_cls"] == pytest.approx(cls_top1) and result.final["eval_top1_dist"] == pytest.approx(dist_top1)


def test_a_run_folder_is_not_overwritten_and_resume_checks_the_recipe(tmp_path):
    cfg = load_recipe("demo_teacher", tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", "optim.epochs=1"))
    train(cfg)
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    changed = load_recipe(
        "demo_teacher", tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", "optim.epochs=2", "optim.lr=0.1")
    )
    with pytest.raises(UserError, match="optim.lr"):
        train(changed, resume=True)
    longer = load_recipe("demo_teacher", tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", "optim.epochs=2"))
    assert len(train(longer, resume=True).history) == 2  # more epochs is a valid resume


def test_ema_weights_are_exported_and_evaluated(tmp_path, monkeypatch):
    """The exported EMA equals e <- d e + (1 - d) w after every update after the first (timm's
    ModelEmaV3 copies the weights at step 1), computed independently."""
    decay, snapshots = 0.9, []
    original = trainer_module.Trainer.train_step

    def record(self, *args):
        out = original(self, *args)
        snapshots.append({k: v.detach().clone() for k, v in self.model.backbone.named_parameters()})
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", record)
    result = train(
        load_recipe("demo_teacher", tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", f"engine.ema_decay={decay}"))
    )
    expected = dict(snapshots[0])
    for snapshot in snapshots[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * snapshot[k] for k in expected}
    ema, plain = weights(result.output / "model_ema.safetensors"), weights(result.output / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema[k], plain[k]) for k in expected)
    assert evaluate_checkpoint(result.output / "model_ema.safetensors")["top1"] == pytest.approx(result.final["ema_top1"])


def test_divergence_stops_with_a_clear_error(tmp_path):
    cfg = load_recipe("demo_teacher", tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", "optim.lr=1e30", "optim.epochs=2"))
    with pytest.raises(UserError, match="diverged"):
        train(cfg)
