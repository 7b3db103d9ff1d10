"""Models by timm name, small-image stems, export round trip, and the online teacher."""

from __future__ import annotations

import pytest
import torch

from vitdistill.config import DataConfig, ModelConfig, TeacherConfig
from vitdistill.data import open_source
from vitdistill.errors import UserError
from vitdistill.models import build_model, export_model, load_model
from vitdistill.targets import OnlineTeacher, build_online_teacher


def test_deit_ti_patch4_at_32_has_two_heads():
    model = build_model(ModelConfig(name="deit_tiny_distilled_patch16_224", img_size=32, patch_size=4), 10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == out.dist_logits.shape == (2, 10)
    assert out.tokens.shape == (2, 2 + 64, 192)  # class + distillation token + 8x8 patches
    assert not torch.allclose(out.logits, out.dist_logits)


@pytest.mark.parametrize("name, factor", [("resnet18", 4), ("regnety_002", 2), ("convnext_atto", 4)])
def test_small_input_stem_keeps_resolution(name, factor):
    """The stem's downsampling is removed: x4 for ResNet (stride-2 conv + max-pool) and ConvNeXt
    (4x4 patchify), x2 for RegNet (stride-2 conv)."""
    plain = build_model(ModelConfig(name=name), 10).eval()
    small = build_model(ModelConfig(name=name, small_input_stem=True), 10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert small.backbone.forward_features(x).shape[-1] == factor * plain.backbone.forward_features(x).shape[-1]


def test_small_input_stem_on_an_unsupported_model_is_a_clear_error():
    with pytest.raises(UserError, match="small_input_stem"):
        build_model(ModelConfig(name="deit_tiny_patch16_224", img_size=32, patch_size=4, small_input_stem=True), 10)


def test_unknown_model_and_bad_kwargs_are_clear_errors():
    with pytest.raises(UserError, match="unknown timm model"):
        build_model(ModelConfig(name="resnet_does_not_exist"), 10)


def test_export_round_trip(tmp_path):
    model = build_model(
        ModelConfig(name="resnet18", small_input_stem=True),
        10,
        classes=list("abcdefghij"),
        input_size=32,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    ).eval()
    export_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.spec.mean == (0.1, 0.2, 0.3) and loaded.spec.classes == list("abcdefghij") and not loaded.training


def teacher_export(tmp_path, num_classes=10, **spec):
    model = build_model(ModelConfig(name="vitdistill_convnet_tiny"), num_classes, **spec)
    export_model(model, tmp_path / "t.safetensors")
    return tmp_path / "t.safetensors"


def digits():
    return open_source(DataConfig(source="digits"), "test")


def test_teacher_with_another_class_count_is_an_error(tmp_path):
    with pytest.raises(UserError, match="predicts 5 classes but the data has 10"):
        build_online_teacher(TeacherConfig(checkpoint=str(teacher_export(tmp_path, 5))), digits(), (0.5,) * 3, (0.5,) * 3)


def test_teacher_stays_frozen_in_eval_mode(tmp_path):
    teacher = build_online_teacher(TeacherConfig(checkpoint=str(teacher_export(tmp_path))), digits(), (0.5,) * 3, (0.5,) * 3)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    teacher.model.train()  # e.g. a careless .train() on everything
    from helpers import batch_of

    batch = batch_of([0, 1])
    batch.images = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    prediction = teacher(batch)
    assert not teacher.model.training and not prediction.logits.requires_grad
    for key, value in teacher.model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, before[key]), key


def test_teacher_input_is_renormalised(tmp_path):
    path = teacher_export(tmp_path, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    teacher = build_online_teacher(TeacherConfig(checkpoint=str(path)), digits(), (0.5,) * 3, (0.5,) * 3)
    pixels = torch.rand(2, 3, 8, 8)
    student_view = (pixels - 0.5) / 0.5
    t_mean, t_std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(teacher.prepare(student_view), (pixels - t_mean) / t_std, atol=1e-5)
    same = build_online_teacher(
        TeacherConfig(checkpoint=str(teacher_export(tmp_path, mean=(0.5,) * 3, std=(0.5,) * 3))), digits(), (0.5,) * 3, (0.5,) * 3
    )
    assert same.identity and torch.equal(same.prepare(student_view), student_view)


def test_teacher_by_timm_name_and_state_dict(tmp_path):
    model = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.backbone.state_dict().items()}}, tmp_path / "w.pth")
    teacher = build_online_teacher(
        TeacherConfig(name="vitdistill_convnet_tiny", weights=str(tmp_path / "w.pth")), digits(), (0.5,) * 3, (0.5,) * 3
    )
    assert isinstance(teacher, OnlineTeacher)
    wrong = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7)
    torch.save(wrong.backbone.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not fit"):
        build_online_teacher(
            TeacherConfig(name="vitdistill_convnet_tiny", weights=str(tmp_path / "wrong.pth")), digits(), (0.5,) * 3, (0.5,) * 3
        )
