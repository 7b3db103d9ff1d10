"""Feature distillation: whitening and the loss against their equations, the grid adapter for CNN
and ViT teachers, teachers of other classes, the shared relative position bias and its per-block
conversion, the projector in checkpoints (not in exports), and the two-stage run end to end."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupted_at_epoch, tiny_run
from helpers import batch_of
from safetensors.torch import load_file

from vitdistill import UserError, load_recipe, train
from vitdistill.cli import main
from vitdistill.config import DataConfig, ModelConfig, TeacherConfig
from vitdistill.data import open_source
from vitdistill.device import DistEnv
from vitdistill.engine import trainer as trainer_module
from vitdistill.models import ModelOutput, build_model, export_model
from vitdistill.objective import Objective
from vitdistill.objective.feature import adapt_grid, whiten
from vitdistill.runner import build_trainer
from vitdistill.targets import OnlineTeacher, StoreTargets, TeacherPrediction, TeacherSource, build_online_teacher

BEIT = "model.name=beit_base_patch16_224"
SHARED = "{embed_dim: 32, depth: 2, num_heads: 2, use_abs_pos_emb: false, use_rel_pos_bias: false, use_shared_rel_pos_bias: true}"
PER_BLOCK = "{embed_dim: 32, depth: 2, num_heads: 2, use_abs_pos_emb: false, use_rel_pos_bias: true, use_shared_rel_pos_bias: false}"
TINY_BEIT = [BEIT, "model.img_size=8", "model.patch_size=2", f"model.kwargs={SHARED}"]
CPU = DistEnv(0, 1, torch.device("cpu"))


def digits():
    return open_source(DataConfig(source="digits"), "test", 16)


def beit(kwargs: dict, num_classes: int = 10, **model):
    base = dict(embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False)
    return build_model(
        ModelConfig(name="beit_base_patch16_224", img_size=8, patch_size=2, kwargs={**base, **kwargs}, **model), num_classes, input_size=8
    )


# ---------------------------------------------------------------------------- equations
def test_whitening_is_a_layernorm_over_channels_without_affine():
    t = torch.randn(2, 5, 7) * 3 + torch.arange(7.0)
    mu = t.sum(-1, keepdim=True) / 7
    var = ((t - mu) ** 2).sum(-1, keepdim=True) / 7  # biased, as LayerNorm
    assert torch.allclose(whiten(t), (t - mu) / torch.sqrt(var + 1e-6), atol=1e-6)
    w = whiten(t)
    assert torch.allclose(w.mean(-1), torch.zeros(2, 5), atol=1e-6) and torch.allclose(
        w.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4
    )


class FeatureMaps(TeacherSource):
    """A stand-in source (not registered) that declares feature maps of shape ``(C, H, W)``."""

    kind = "test_feature_maps"
    gives = frozenset({"features"})

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape

    def feature_shape(self, view_size: int) -> tuple[int, int, int]:
        return self.shape


def feature_objective(beta: float, width: int, channels: int, grid=(2, 2), **params) -> Objective:
    """A ``feature`` objective set up for a stand-in student and teacher of the given widths."""
    objective = Objective([{"term": "feature", "beta": beta, **params}], 10, False)
    student = SimpleNamespace(
        token_grid=grid, spec=SimpleNamespace(name="student", input_size=8), backbone=SimpleNamespace(num_features=width)
    )
    teacher = FeatureMaps((channels, *grid))
    objective.setup(student, 0, teacher)
    return objective


def smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


@pytest.mark.parametrize("beta", [0.5, 2.0, 6.0])
def test_feature_loss_matches_its_equation_for_each_beta(beta):
    torch.manual_seed(0)
    objective = feature_objective(beta, width=3, channels=4)
    projector = objective.terms[0].projector
    assert projector.weight.shape == (4, 3)
    tokens = torch.randn(2, 1 + 4, 3) * 4  # one prefix token, 2x2 patches: differences straddle every beta
    teacher_map = torch.randn(2, 4, 2, 2) * 5 + 1
    loss, _ = objective(
        ModelOutput(torch.zeros(2, 10), tokens=tokens, num_prefix=1), batch_of([0, 1], size=8), TeacherPrediction(features=teacher_map)
    )
    w, b = projector.weight.detach().tolist(), projector.bias.detach().tolist()
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):  # token i = row i // 2, column i % 2 (raster order)
            t = [teacher_map[n, c, i // 2, i % 2].item() for c in range(4)]
            mu = sum(t) / 4
            sd = (sum((v - mu) ** 2 for v in t) / 4 + 1e-6) ** 0.5
            h = tokens[n, 1 + i].tolist()
            for c in range(4):
                p = sum(w[c][k] * h[k] for k in range(3)) + b[c]
                total += smooth_l1(p - (t[c] - mu) / sd, beta)
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    others = [
        feature_objective(other, 3, 4)(
            ModelOutput(torch.zeros(2, 10), tokens=tokens, num_prefix=1), batch_of([0, 1], size=8), TeacherPrediction(features=teacher_map)
        )[0]
        for other in (0.5, 2.0, 6.0)
        if other != beta
    ]
    assert all(abs(o.item() - loss.item()) > 1e-3 for o in others)  # beta changes the value


def test_feature_loss_trains_the_projector_not_the_teacher():
    objective = feature_objective(2.0, width=3, channels=4)
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    loss, parts = objective(
        ModelOutput(torch.zeros(2, 10), tokens=tokens), batch_of([0, 1], size=8), TeacherPrediction(features=torch.randn(2, 4, 2, 2))
    )
    loss.backward()
    assert tokens.grad is not None and objective.terms[0].projector.weight.grad is not None
    assert list(parts) == ["feature"]
    assert [p.shape for p in objective.parameters()] == [(4, 3), (4,)]  # what the trainer optimises and saves


def test_a_bad_beta_and_a_teacher_without_features_are_clear_errors():
    from vitdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.0\.beta"):
        Objective([{"term": "feature", "beta": 0}], 10, False)
    objective = Objective([{"term": "feature"}], 10, False)
    student = SimpleNamespace(token_grid=(2, 2), spec=SimpleNamespace(name="s", input_size=8), backbone=SimpleNamespace(num_features=4))
    with pytest.raises(UserError, match="no feature maps"):
        objective.setup(student, 0, StoreTargets.__new__(StoreTargets))  # a store (as declared: class predictions only)
    with pytest.raises(UserError, match="no feature maps"):
        objective.setup(student, 0, teacher_from(build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7), layer=None, logits=True))
    with pytest.raises(UserError, match="feature maps"):
        TeacherPrediction(logits=torch.zeros(1, 3)).feature_map()


# ---------------------------------------------------------------------------- teachers and grids
def teacher_from(model, layer=-1, logits=False, norm=None) -> OnlineTeacher:
    return OnlineTeacher(model, (0.5,) * 3, (0.5,) * 3, (0.5,) * 3, (0.5,) * 3, feature_layer=layer, logits=logits, feature_norm=norm)


def test_cnn_teacher_features_on_another_grid():
    cnn = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7).eval()  # 7 classes: not the data's 10
    teacher = teacher_from(cnn)
    views = batch_of([0, 1], size=8)
    views.images = torch.randn(2, 3, 8, 8)
    prediction = teacher(views)
    assert prediction.logits is None and teacher.feature_shape(8) == (64, 2, 2)
    assert torch.equal(prediction.features, cnn.backbone.features(views.images))  # last stage, NCHW, 2x2 grid
    first = teacher_from(cnn, layer=0)(views).features
    assert torch.equal(first, cnn.backbone.features[0](views.images))  # 8x8 grid, 16 channels
    x = prediction.features  # 2x2 -> 4x4
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # bilinear, align_corners=False
    expected = torch.einsum("ih,bchw,jw->bijc", weights, x, weights).reshape(2, 16, 64)
    assert torch.allclose(adapt_grid(x, (4, 4), "interpolate"), expected, atol=1e-5)
    assert torch.equal(adapt_grid(x, (4, 4), "pool"), x.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2))
    pooled = first.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # 8x8 -> 4x4: 2x2 means
    assert torch.allclose(adapt_grid(first, (4, 4), "pool"), pooled, atol=1e-6)
    assert adapt_grid(first, (4, 4), "interpolate").shape == (2, 16, 16)
    assert torch.equal(adapt_grid(first, (8, 8)), first.flatten(2).transpose(1, 2))  # same grid: unchanged


def test_vit_teacher_features_drop_prefix_tokens_and_keep_its_width():
    vit = build_model(
        ModelConfig(name="deit_tiny_distilled_patch16_224", img_size=8, patch_size=2, kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2}),
        5,
    ).eval()
    teacher = teacher_from(vit, logits=True, norm=False)  # the raw block output
    views = batch_of([0, 1], size=8)
    views.images = torch.randn(2, 3, 8, 8)
    seen = {}
    handle = vit.backbone.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(tokens=out))
    prediction = teacher(views)
    handle.remove()
    patches = seen["tokens"][:, 2:]  # class and distillation tokens dropped
    assert teacher.feature_shape(8) == (48, 4, 4)
    assert torch.allclose(prediction.features, patches.reshape(2, 4, 4, 48).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(prediction.feature_cls, seen["tokens"][:, 0], atol=1e-6)  # the class token, not the distillation token
    assert torch.allclose(prediction.logits, vit(views.images).head("mean"), atol=1e-5)  # logits from the same pass
    # a student with 2x2 patch tokens (4x4 pixels each): each target token averages 2x2 teacher tokens
    target = adapt_grid(prediction.features, (2, 2), "pool")
    assert target.shape == (2, 4, 48)
    assert torch.allclose(target[:, 0], patches[:, [0, 1, 4, 5]].mean(1), atol=1e-6)
    with pytest.raises(UserError, match="teacher.feature_layer"):
        teacher_from(vit, layer=5).feature_shape(8)


def test_a_teacher_of_other_classes_teaches_features_but_not_logits(tmp_path):
    other = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7)
    torch.save(other.backbone.state_dict(), tmp_path / "seven.pth")
    by_name = TeacherConfig(name="vitdistill_convnet_tiny", weights=str(tmp_path / "seven.pth"))
    teacher = build_online_teacher(by_name, digits(), (0.5,) * 3, (0.5,) * 3, classes=False, features=True)
    assert teacher.model.spec.num_classes == 0 and teacher.feature_shape(8) == (64, 2, 2)
    views = batch_of([0, 1], size=8)
    views.images = torch.randn(2, 3, 8, 8)
    expected = other.eval().backbone.features(teacher.prepare(views.images))  # its own weights, its own normalisation
    assert torch.allclose(teacher(views).features, expected, atol=1e-6)
    with pytest.raises(UserError, match="does not fit|7 classes"):
        build_online_teacher(by_name, digits(), (0.5,) * 3, (0.5,) * 3, classes=True, features=True)
    export_model(other, tmp_path / "seven.safetensors")
    by_export = build_online_teacher(
        TeacherConfig(checkpoint=str(tmp_path / "seven.safetensors")), digits(), (0.5,) * 3, (0.5,) * 3, classes=False, features=True
    )
    assert by_export.feature_shape(8) == (64, 2, 2)


def test_feature_only_run_with_a_teacher_of_other_classes_and_errors(tmp_path):
    export_model(
        build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7, input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3),
        tmp_path / "seven.safetensors",
    )
    teacher = [f"teacher.checkpoint={tmp_path / 'seven.safetensors'}"]
    cfg = load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "fd", *TINY_BEIT, *teacher, "optim.epochs=1"))
    result = train(cfg)
    assert result.final["train_feature"] > 0
    logits_too = load_recipe(
        "fd_pretrain_digits", tiny_run(tmp_path / "kd", *TINY_BEIT, *teacher, "objective=[{term: feature}, {term: kd_hard}]")
    )
    with pytest.raises(UserError, match="predicts 7 classes but the data has 10"):
        build_trainer(logits_too, CPU, tmp_path / "kd")
    stored = load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "st", *TINY_BEIT, "teacher={store: /nowhere}"))
    with pytest.raises(UserError, match="teacher.store: .*online teacher"):
        build_trainer(stored, CPU, tmp_path / "st")
    cnn_student = load_recipe(
        "fd_pretrain_digits",
        tiny_run(
            tmp_path / "cnn",
            *teacher,
            "model.name=vitdistill_convnet_tiny",
            "model.img_size=null",
            "model.patch_size=null",
            "model.kwargs={}",
        ),
    )
    with pytest.raises(UserError, match="vision transformer"):
        build_trainer(cnn_student, CPU, tmp_path / "cnn")


def test_feature_composes_with_hard_distillation_and_labels_in_one_teacher_pass(tmp_path, tiny_teacher, monkeypatch):
    objective = "objective=[{term: feature, weight: 0.5}, {term: kd_hard, weight: 0.5}, {term: ce, weight: 0.5}]"
    cfg = load_recipe(
        "fd_pretrain_digits", tiny_run(tmp_path / "all", *TINY_BEIT, f"teacher.checkpoint={tiny_teacher}", objective, "optim.epochs=1")
    )
    (tmp_path / "all").mkdir()
    trainer = build_trainer(cfg, CPU, tmp_path / "all")
    calls, seen = {"n": 0}, []
    forward = trainer.teacher.model.forward_with_features

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.teacher.model, "forward_with_features", counted)
    original = trainer_module.TrainStep.forward
    monkeypatch.setattr(
        trainer_module.TrainStep, "forward", lambda self, batch, teacher: seen.append(teacher) or original(self, batch, teacher)
    )
    history = trainer.fit()
    assert calls["n"] == trainer.steps  # one teacher pass per step gives both
    assert all(p.logits is not None and p.features is not None for p in seen)
    assert {"train_feature", "train_kd_hard", "train_ce"} <= set(history[-1])


# ---------------------------------------------------------------------------- shared relative position bias
def test_shared_relative_position_bias_is_one_parameter_used_by_every_block():
    model = beit({"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}).eval()
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables == ["backbone.rel_pos_bias.relative_position_bias_table"]
    with torch.no_grad():
        model.backbone.rel_pos_bias.relative_position_bias_table.normal_()
    given = []
    handles = [
        b.register_forward_pre_hook(lambda m, args, kwargs: given.append(kwargs["shared_rel_pos_bias"]), with_kwargs=True)
        for b in model.backbone.blocks
    ]
    model(torch.randn(2, 3, 8, 8))
    for h in handles:
        h.remove()
    assert len(given) == 2 and all(torch.equal(g, model.backbone.rel_pos_bias()) for g in given)
    model.train()
    model(torch.randn(2, 3, 8, 8)).logits.sum().backward()
    assert model.backbone.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0


def test_model_init_copies_the_shared_table_into_every_block(tmp_path, capsys):
    shared = beit({"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}).eval()
    with torch.no_grad():
        shared.backbone.rel_pos_bias.relative_position_bias_table.normal_()
    export_model(shared, tmp_path / "shared.safetensors")
    per_block = beit({"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}, init=str(tmp_path / "shared.safetensors")).eval()
    assert "starts each of the 2 blocks' own tables" in capsys.readouterr().out
    table = shared.backbone.rel_pos_bias.relative_position_bias_table
    own = [b.attn.relative_position_bias_table for b in per_block.backbone.blocks]
    assert per_block.backbone.rel_pos_bias is None and len(own) == 2
    assert all(torch.equal(t, table) for t in own) and own[0].data_ptr() != own[1].data_ptr()  # exact copies, separate
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(per_block(x).logits, shared(x).logits, atol=1e-5)  # the same function until fine-tuning moves them


# ---------------------------------------------------------------------------- checkpoints, resume, export
def test_projector_is_saved_restored_on_resume_and_not_exported(tmp_path, tiny_teacher):
    overrides = [*TINY_BEIT, f"teacher.checkpoint={tiny_teacher}", "optim.epochs=2", "model.drop_path=0.1"]
    straight = train(load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "straight", *overrides)))
    with interrupted_at_epoch(2), pytest.raises(KeyboardInterrupt):
        train(load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "resumed", *overrides)))
    after_one = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["objective"]
    train(load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "resumed", *overrides)), resume=True)

    a = torch.load(straight.output / "checkpoint.pt", weights_only=False)["objective"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["objective"]
    assert set(a) == {"terms.0.projector.weight", "terms.0.projector.bias"} and a["terms.0.projector.weight"].shape == (
        32,
        32,
    )  # teacher stage 1: 32 channels
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: restored, then trained the same
    assert not torch.equal(a["terms.0.projector.weight"], after_one["terms.0.projector.weight"])  # and it did train
    for folder in (straight.output, tmp_path / "resumed"):
        exported = load_file(str(folder / "model.safetensors"))
        assert not any("projector" in k or k.startswith("terms.") for k in exported)
        assert "rel_pos_bias.relative_position_bias_table" in exported


# ---------------------------------------------------------------------------- two stages, end to end
def test_two_stage_feature_distillation_on_digits_end_to_end(tmp_path, tiny_teacher):
    pre, fine, base = tmp_path / "pre", tmp_path / "fine", tmp_path / "base"
    student = ["model.img_size=8", "model.patch_size=2", "optim.epochs=4", "data.train_limit=512"]
    assert (
        main(["train", "fd_pretrain_digits", *tiny_run(pre, *student, f"model.kwargs={SHARED}", f"teacher.checkpoint={tiny_teacher}")]) == 0
    )
    history = json.loads((pre / "summary.json").read_text())
    rows = list(csv.DictReader(open(pre / "metrics.csv")))
    losses = [float(r["train_feature"]) for r in rows]
    assert losses[-1] < 0.9 * losses[0], losses  # the student learns the teacher's features
    assert history["epochs"] == 4

    finetune = tiny_run(fine, *student, f"model.kwargs={PER_BLOCK}", f"model.init={pre}")
    cfg = load_recipe("fd_finetune_digits", finetune)
    trainer = build_trainer(cfg, CPU, fine)
    stage1 = load_file(str(pre / "model.safetensors"))
    start = trainer.model.backbone.state_dict()
    loaded = [k for k in stage1 if k in start and not k.startswith("head.")]
    assert len(loaded) > 10 and all(torch.equal(start[k], stage1[k]) for k in loaded)  # starts from stage 1
    assert all(
        torch.equal(start[f"blocks.{i}.attn.relative_position_bias_table"], stage1["rel_pos_bias.relative_position_bias_table"])
        for i in range(2)
    )
    assert (
        max(g["lr_scale"] for g in trainer.optimizer.param_groups) == 1.0
        and min(g["lr_scale"] for g in trainer.optimizer.param_groups) < 0.75**2
    )
    assert trainer.teacher is None
    assert main(["train", "fd_finetune_digits", *finetune]) == 0
    assert (
        main(
            [
                "train",
                "fd_finetune_digits",
                *tiny_run(base, *student, f"model.kwargs={PER_BLOCK}", "model.init=null", "optim.layer_decay=null"),
            ]
        )
        == 0
    )
    ce = [float(r["train_ce"]) for r in csv.DictReader(open(fine / "metrics.csv"))]
    assert ce[-1] < ce[0] and "eval_top1" in json.loads((fine / "summary.json").read_text())["final"]  # it learns the labels

    out = tmp_path / "analysis"
    args = [
        str(fine),
        "--compare",
        str(base),
        "--output",
        str(out),
        "--images",
        "32",
        "--landscape-images",
        "16",
        "--landscape-steps",
        "3",
        "--landscape-grid",
        "0",
    ]
    assert main(["analyze", *args]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert [m["model"] for m in analysis["models"]] == ["beit_base_patch16_224"] * 2
    for m in analysis["models"]:
        assert len(m["layers"]["attention_distance"]) == 2 and len(m["layers"]["attention_distance"][0]) == 2  # blocks x heads
    assert {"attention_distance", "head_similarity", "landscape_1d"} <= set(analysis["figures"]) and (
        out / "attention_distance.png"
    ).is_file()
