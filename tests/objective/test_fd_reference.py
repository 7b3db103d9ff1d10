"""Feature distillation as the authors' reference code runs it (SwinTransformer/Feature-Distillation):
the target is the teacher's output after its final norm, whitened, class token included; the
student's tokens are taken after its final norm (timm's fc_norm in average-pooled models); the
class token enters the loss only when asked; and the settings the paper recipes need (the student's
truncated init, layer decay on the peak lr only, weight decay on relative position bias tables and
not on the projector's bias).

The reference computations below are written from the reference's description, not from its code:
``models/feature_distillation.py`` (class ``FD``, flag ``PRED_FEAT_AFTERNORM``; the encoder
``VisionTransformerForFD``: the last block's output through ``self.norm``, every token kept, a
``Conv1d`` projector, ``nn.LayerNorm(C, elementwise_affine=False)`` on the target,
``nn.SmoothL1Loss(beta=2.0)``, ``.mean()``) and ``optimizer.py`` / ``lr_scheduler.py`` (timm 0.4.12).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import batch_of
from torch import nn

from vitdistill import UserError
from vitdistill.config import ModelConfig, OptimConfig
from vitdistill.engine.optim import build_optimizer, build_scheduler
from vitdistill.models import ModelOutput, build_model
from vitdistill.objective import Objective
from vitdistill.targets import OnlineTeacher, TeacherPrediction, TeacherSource

SIZE = 8  # 8x8 views, 2x2 patches: a 4x4 token grid


def vit(name: str, classes: int = 5, **kwargs) -> torch.nn.Module:
    return build_model(
        ModelConfig(name=name, img_size=SIZE, patch_size=2, kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2, **kwargs}),
        classes,
        input_size=SIZE,
    ).eval()


def randomise(norm: nn.LayerNorm) -> None:
    """A non-trivial affine norm: weight far from 1, bias far from 0 (mean != std)."""
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) * 2 + 0.3)
        norm.bias.copy_(torch.randn_like(norm.bias) * 0.7 + 0.2)


def raw_sequence(net, x: torch.Tensor) -> torch.Tensor:
    """All tokens ``[B, 1 + N, C]`` output by the last block of a timm ViT or BEiT, computed
    block by block (no timm helper that could carry the norm)."""
    t = net.patch_embed(x)
    t = torch.cat([net.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    if getattr(net, "pos_embed", None) is not None:
        t = t + net.pos_embed
    t = getattr(net, "norm_pre", nn.Identity())(t)
    shared = net.rel_pos_bias() if getattr(net, "rel_pos_bias", None) is not None else None
    for block in net.blocks:
        t = block(t, shared_rel_pos_bias=shared) if hasattr(net, "rel_pos_bias") else block(t)
    return t


def teacher_of(model, norm=None) -> OnlineTeacher:
    same = (0.5, 0.25, 0.4)  # the student's and teacher's normalisation: no renormalisation
    return OnlineTeacher(model, same, same, same, same, feature_layer=-1, logits=False, feature_norm=norm)


def feature_term(student, teacher, **params):
    objective = Objective([{"term": "feature", "beta": 2.0, **params}], 5, False)
    objective.setup(student, 0, teacher)
    return objective


def reference_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, projector: nn.Linear) -> torch.Tensor:
    """FD.forward: Conv1d(kernel 1) on every student token, LayerNorm without affine (eps 1e-5) on
    every teacher token, SmoothL1(beta 2) averaged over all elements."""
    conv = nn.Conv1d(projector.in_features, projector.out_features, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(projector.weight[:, :, None])
        conv.bias.copy_(projector.bias)
    x_rec = conv(student_tokens.permute(0, 2, 1)).permute(0, 2, 1)
    x_tgt = nn.LayerNorm(teacher_tokens.shape[-1], elementwise_affine=False)(teacher_tokens)
    return nn.SmoothL1Loss(beta=2.0)(x_rec, x_tgt).mean()


# ---------------------------------------------------------------------------- the target and the student's tokens
@pytest.mark.parametrize("teacher_name", ["vit_base_patch16_224.dino", "vit_base_patch16_clip_224.openai"])
def test_the_loss_is_the_references_after_norm_on_every_token(teacher_name):
    torch.manual_seed(0)
    teacher_model = vit(teacher_name, classes=0, embed_dim=48)
    randomise(teacher_model.backbone.norm)
    student = vit("beit_base_patch16_224", use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    assert isinstance(student.backbone.norm, nn.Identity)  # BEiT pools on average: its final norm is fc_norm
    randomise(student.backbone.fc_norm)
    teacher = teacher_of(teacher_model)  # default: after the final norm, for a ViT
    objective = feature_term(student, teacher, class_token=True, eps=1e-5)
    x = torch.randn(3, 3, SIZE, SIZE) * 0.8 + 0.1
    views = batch_of([0, 1, 2], size=SIZE)
    views.images = x
    with torch.no_grad():
        loss, _ = objective(student(x), views, teacher(views))
        teacher_tokens = teacher_model.backbone.norm(raw_sequence(teacher_model.backbone, x))  # PRED_FEAT_AFTERNORM
        student_tokens = student.backbone.fc_norm(raw_sequence(student.backbone, x))  # encoder: blocks, then the final norm
        expected = reference_loss(student_tokens, teacher_tokens, objective.terms[0].projector)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    # the randomised norms matter: the raw block outputs give another loss
    with torch.no_grad():
        raw = feature_term(student, teacher_of(teacher_model, norm=False), class_token=True, eps=1e-5)
        raw.terms[0].projector.load_state_dict(objective.terms[0].projector.state_dict())
        before_norm, _ = raw(student(x), views, teacher_of(teacher_model, norm=False)(views))
    assert abs(before_norm.item() - loss.item()) > 1e-3


def test_the_teachers_target_is_its_normalised_tokens_whitened():
    torch.manual_seed(1)
    teacher_model = vit("vit_base_patch16_224.dino", classes=0, embed_dim=48)
    randomise(teacher_model.backbone.norm)
    views = batch_of([0, 1], size=SIZE)
    views.images = torch.randn(2, 3, SIZE, SIZE)
    prediction = teacher_of(teacher_model)(views)
    with torch.no_grad():
        normed = teacher_model.backbone.norm(raw_sequence(teacher_model.backbone, views.images))
    assert torch.allclose(prediction.feature_cls, normed[:, 0], atol=1e-5)
    assert torch.allclose(prediction.features.flatten(2).transpose(1, 2), normed[:, 1:], atol=1e-5)  # raster order on the 4x4 grid
    assert teacher_of(teacher_model).feature_shape(SIZE) == (48, 4, 4)


@pytest.mark.parametrize(
    "name, kwargs, norm",
    [
        ("beit_base_patch16_224", {"use_abs_pos_emb": False}, "fc_norm"),  # average pooling: timm normalises after pooling
        ("vit_base_patch16_224", {"global_pool": "avg"}, "fc_norm"),
        ("vit_base_patch16_224", {}, "norm"),  # class-token pooling: every token through norm
    ],
)
def test_the_students_tokens_are_after_its_final_norm(name, kwargs, norm):
    torch.manual_seed(2)
    student = vit(name, **kwargs)
    randomise(getattr(student.backbone, norm))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = student(x)
        expected = getattr(student.backbone, norm)(raw_sequence(student.backbone, x))
    assert torch.allclose(out.final_tokens, expected, atol=1e-5)
    assert (out.pending_norm is not None) == (norm == "fc_norm")
    assert torch.allclose(out.logits, student.backbone.forward_head(out.tokens), atol=1e-6)  # the head still pools before fc_norm


class ClassTokenFeatures(TeacherSource):
    """A stand-in source (not registered): 4-channel 2x2 feature maps with the teacher's class token."""

    kind = "test_class_token_features"
    gives = frozenset({"features"})
    has_class_token = True

    def feature_shape(self, view_size: int) -> tuple[int, int, int]:
        return (4, 2, 2)


def test_the_class_token_enters_the_loss_only_when_asked():
    def grads(class_token: bool) -> torch.Tensor:
        torch.manual_seed(3)
        student = SimpleNamespace(
            token_grid=(2, 2),
            spec=SimpleNamespace(name="s", input_size=8),
            backbone=SimpleNamespace(num_features=3, cls_token=torch.zeros(1, 1, 3)),
        )
        teacher = ClassTokenFeatures()
        objective = feature_term(student, teacher, class_token=class_token)
        tokens = (torch.randn(2, 1 + 4, 3) * 2).requires_grad_(True)
        prediction = TeacherPrediction(features=torch.randn(2, 4, 2, 2) + 1, feature_cls=torch.randn(2, 4) * 3)
        loss, _ = objective(ModelOutput(torch.zeros(2, 5), tokens=tokens, num_prefix=1), batch_of([0, 1], size=8), prediction)
        loss.backward()
        return tokens.grad

    on, off = grads(True), grads(False)
    assert on[:, 0].abs().sum() > 0 and on[:, 1:].abs().sum() > 0
    assert torch.equal(off[:, 0], torch.zeros_like(off[:, 0])) and off[:, 1:].abs().sum() > 0
    assert torch.allclose(on[:, 1:] * 5, off[:, 1:] * 4, atol=1e-6)  # the mean runs over N + 1 = 5 tokens instead of 4


def test_class_token_needs_one_on_both_sides_and_cnns_have_no_final_norm():
    cnn = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 3).eval()
    student = vit("beit_base_patch16_224", use_abs_pos_emb=False)
    with pytest.raises(UserError, match="class_token: the teacher has no class token"):
        feature_term(student, teacher_of(cnn), class_token=True)
    assert teacher_of(cnn).feature_norm is False  # a CNN's stages: no final norm, by default
    with pytest.raises(UserError, match="teacher.feature_norm"):
        teacher_of(cnn, norm=True).feature_shape(SIZE)
    no_cls = vit("vit_base_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(UserError, match="the student .* has no class token"):
        feature_term(no_cls, teacher_of(vit("vit_base_patch16_224.dino", classes=0)), class_token=True)


# ---------------------------------------------------------------------------- the settings the paper recipes need
def test_truncated_init_is_the_references():
    torch.manual_seed(4)
    cfg = ModelConfig(
        name="beit_base_patch16_224",
        img_size=32,
        patch_size=4,
        init_truncation=1.0,
        kwargs={"embed_dim": 192, "depth": 3, "num_heads": 3, "use_abs_pos_emb": True},
    )
    model = build_model(cfg, 10, input_size=32)
    net = model.backbone
    qkv = net.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= 0.02 + 1e-7 and qkv.std().item() == pytest.approx(0.02 * 0.5377, rel=0.03)  # N(0, 0.02^2) cut at +-1 std
    for name in ("pos_embed", "cls_token"):
        assert getattr(net, name).abs().max() <= 0.02 + 1e-7
    assert net.patch_embed.proj.weight.abs().max() <= 0.02 + 1e-7 and torch.equal(
        net.blocks[0].mlp.fc1.bias, torch.zeros_like(net.blocks[0].mlp.fc1.bias)
    )
    for i, block in enumerate(net.blocks):  # BEiT's rescaling, after the draw
        assert block.mlp.fc2.weight.abs().max() <= 0.02 / math.sqrt(2 * (i + 1)) + 1e-7
    assert net.head.weight.abs().max() > 0 and net.head.weight.abs().max() < 1e-3  # the head keeps timm's (x head_init_scale 0.001)
    default = build_model(ModelConfig(name=cfg.name, img_size=32, patch_size=4, kwargs=cfg.kwargs), 10, input_size=32)
    assert default.backbone.blocks[0].attn.qkv.weight.abs().max() > 0.03  # timm: practically untruncated, std 0.02


def shared_floor_lrs(layer_decay_scales_floor: bool):
    model = vit("beit_base_patch16_224", use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    cfg = OptimConfig(
        epochs=4,
        lr=1e-3,
        lr_base_batch=None,
        warmup_epochs=1,
        warmup_lr=1e-6,
        min_lr=2e-6,
        layer_decay=0.5,
        layer_decay_scales_floor=layer_decay_scales_floor,
    )
    optimizer = build_optimizer(model.backbone, [], cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    trace = []
    for step in range(40):
        scheduler.step_update(step)
        trace.append([g["lr"] for g in optimizer.param_groups])
    return trace


def test_layer_decay_on_the_peak_lr_only_as_timm_0_4_12():
    trace = shared_floor_lrs(False)
    start, peak, end = trace[0], trace[10], trace[39]
    assert all(v == pytest.approx(1e-6) for v in start)  # warmup starts at warmup_lr in every block
    assert sorted({round(v / 1e-3, 6) for v in peak}) == [0.125, 0.25, 0.5, 1.0]  # 0.5^k per layer below the head (2 blocks + stem)
    expected_end = [2e-6 + 0.5 * (p - 2e-6) * (1 + math.cos(math.pi * 29 / 30)) for p in peak]
    assert end == pytest.approx(expected_end, rel=1e-6)  # cosine towards the same min_lr for every block
    scaled = shared_floor_lrs(True)
    assert len({round(v, 12) for v in scaled[0]}) > 1  # timm >= 0.9: the floor is scaled per block too
    assert [round(v, 12) for v in scaled[10]] == [round(v, 12) for v in peak]  # the same peaks


def test_weight_decay_on_relative_position_tables_and_not_on_the_projectors_bias():
    model = vit("beit_base_patch16_224", use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    projector = nn.Linear(24, 7)
    decay_of = {}
    for flag in (False, True):
        optimizer = build_optimizer(model.backbone, list(projector.parameters()), OptimConfig(weight_decay=0.05, decay_rel_pos_bias=flag))
        named = {id(p): n for n, p in model.backbone.named_parameters()} | {
            id(projector.weight): "projector.weight",
            id(projector.bias): "projector.bias",
        }
        decay_of[flag] = {named[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    table = "rel_pos_bias.relative_position_bias_table"
    assert decay_of[False][table] == 0.0 and decay_of[True][table] == 0.05
    for flag in (False, True):
        assert decay_of[flag]["projector.weight"] == 0.05 and decay_of[flag]["projector.bias"] == 0.0
        assert decay_of[flag]["cls_token"] == 0.0 and decay_of[flag]["blocks.0.attn.qkv.weight"] == 0.05
