"""Token labeling: label maps, crop-aligned token targets, MixToken, the token_label term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from helpers import batch_of

from vitdistill import ConfigError, UserError, load_recipe, train
from vitdistill.augment import Augmenter
from vitdistill.cli import main
from vitdistill.config import AugmentConfig, ModelConfig
from vitdistill.data import ImageSource, open_source
from vitdistill.labelmaps import LabelMapManifest, write_label_maps
from vitdistill.labelmaps.maps import dense_scores
from vitdistill.models import ModelOutput, build_model
from vitdistill.models.output import TokenMix
from vitdistill.objective import Objective
from vitdistill.objective.token_label import sample_token_mix
from vitdistill.rng import CounterRNG
from vitdistill.targets import TeacherPrediction, build_online_teacher
from vitdistill.targets.labelmaps import pool_tokens, to_distribution

A, B, C = 0, 1, 3  # two classes in the map, three in all


def halves_map(h: int, w: int, vertical: bool) -> torch.Tensor:
    """``[1, C, h, w]`` probabilities: class A in the top (left) half, B in the bottom (right)."""
    dense = torch.zeros(1, C, h, w)
    if vertical:
        dense[0, A, : h // 2], dense[0, B, h // 2 :] = 1, 1
    else:
        dense[0, A, :, : w // 2], dense[0, B, :, w // 2 :] = 1, 1
    return dense


@pytest.mark.parametrize("source_size", [(32, 32), (24, 40)])  # non-square: a swapped x/y shows
def test_token_targets_follow_the_content_row_by_row_and_column_by_column(source_size):
    H, W = source_size
    rows_map = halves_map(4, 4, vertical=True)
    cols_map = halves_map(4, 4, vertical=False)
    # a crop of the bottom half: every token row is B
    tokens, crop = pool_tokens(rows_map, torch.tensor([[0.0, H / 2, W, H]]), torch.tensor([False]), source_size, (4, 4))
    assert (tokens[0].argmax(-1) == B).all() and crop[0].argmax() == B
    # a crop across the boundary: top two token rows A, bottom two B
    tokens, _ = pool_tokens(rows_map, torch.tensor([[0.0, H / 4, W, 3 * H / 4]]), torch.tensor([False]), source_size, (4, 4))
    assert tokens[0].argmax(-1).view(4, 4).tolist() == [[A] * 4, [A] * 4, [B] * 4, [B] * 4]
    # the same on columns, and a flip mirrors the columns
    box = torch.tensor([[W / 4, 0.0, 3 * W / 4, H]])
    tokens, _ = pool_tokens(cols_map, box, torch.tensor([False]), source_size, (4, 4))
    assert tokens[0].argmax(-1).view(4, 4).tolist() == [[A, A, B, B]] * 4
    flipped, _ = pool_tokens(cols_map, box, torch.tensor([True]), source_size, (4, 4))
    assert flipped[0].argmax(-1).view(4, 4).tolist() == [[B, B, A, A]] * 4
    # the reference passes (y1, x1, y2, x2): on a crop of the right half it labels the wrong region
    right = torch.tensor([[W / 2, 0.0, W, H / 2]])
    tokens, _ = pool_tokens(cols_map, right, torch.tensor([False]), source_size, (4, 4))
    swapped, _ = pool_tokens(cols_map, right[:, [1, 0, 3, 2]], torch.tensor([False]), source_size, (4, 4))
    assert (tokens[0].argmax(-1) == B).all()
    assert not (swapped[0].argmax(-1) == B).all()


def test_token_targets_match_the_pixels_of_real_augmented_views():
    """Images bright on top and dark below, label map A on top and B below: through random
    resized crops and flips, every token whose pixels are all bright is labelled A, all dark B."""
    H = W = 32
    img = torch.zeros(H, W, 3, dtype=torch.uint8)
    img[: H // 2] = 255
    source = ImageSource(
        images=img.expand(64, H, W, 3).clone(), labels=torch.zeros(64, dtype=torch.long), classes=list("abc"), name="halves", items_hash="x"
    )
    views = Augmenter(
        source, AugmentConfig(input_size=16, crop="rrc", scale=(0.1, 0.6), hflip=0.5), 3, (0.0,) * 3, (1.0,) * 3, torch.device("cpu")
    )
    batch = views.train_batch(torch.arange(64), epoch=0)
    tokens, _ = pool_tokens(halves_map(8, 8, True).expand(64, -1, -1, -1), batch.boxes, batch.flips, (H, W), (4, 4))
    pixel_tokens = batch.images[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).reshape(64, 16, 16)  # [B, token, pixels]
    bright, dark = (pixel_tokens > 0.99).all(-1), (pixel_tokens < 0.01).all(-1)
    labels = tokens.argmax(-1)
    assert bright.sum() > 100 and dark.sum() > 100
    assert (labels[bright] == A).all() and (labels[dark] == B).all()


def test_zero_filled_and_topk_softmax_modes():
    pooled = torch.tensor([[2.0, 0.0, 0.0]])
    assert torch.allclose(to_distribution(pooled, "zero_filled"), torch.softmax(pooled, -1))
    probs = torch.tensor([[0.3, 0.1, 0.0]])
    assert torch.allclose(to_distribution(probs, "topk_softmax"), torch.tensor([[0.75, 0.25, 0.0]]))
    assert torch.allclose(to_distribution(torch.zeros(1, 3), "topk_softmax"), torch.full((1, 3), 1 / 3))  # all padding


def test_dense_scores_are_the_classifier_at_every_location(tmp_path):
    from vitdistill.config import TeacherConfig
    from vitdistill.models import export_model

    for name, stem in (("vitdistill_convnet_tiny", False), ("resnet18", True)):
        model = build_model(ModelConfig(name=name, small_input_stem=stem), 10).eval()
        export_model(model, tmp_path / "t.safetensors")
        teacher = build_online_teacher(
            TeacherConfig(checkpoint=str(tmp_path / "t.safetensors")),
            open_source(__import__("vitdistill").config.DataConfig(source="digits"), "test"),
            (0.5,) * 3,
            (0.5,) * 3,
        )
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            dense = dense_scores(teacher, x)
            image_logits = teacher.model(teacher.prepare(x)).logits
        assert dense.shape[:2] == (2, 10) and dense.shape[-1] > 1
        assert torch.allclose(dense.mean(dim=(2, 3)), image_logits, atol=1e-4)  # linear head after average pooling


def test_mixtoken_boxes_and_model_forward():
    grid, rng = (4, 4), CounterRNG(0)
    mix = sample_token_mix(rng, 0, torch.arange(200), grid)
    assert mix.mask.shape == (200, 16) and torch.equal(mix.partner, torch.arange(199, -1, -1))
    u = rng.uniform(0, torch.arange(200), "mixtoken", 3).tolist()
    for b in range(200):  # LV-ViT's rand_bbox, recomputed by hand from the same uniforms
        lam, cy, cx = u[b][0], math.floor(u[b][1] * 4), math.floor(u[b][2] * 4)
        cut = math.floor(4 * math.sqrt(1 - lam))
        y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, 4)
        x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, 4)
        expected = [[y1 <= r < y2 and x1 <= c < x2 for c in range(4)] for r in range(4)]
        assert mix.mask[b].view(4, 4).tolist() == expected, b
    assert mix.mask.any(dim=1).float().mean() > 0.3  # most samples mix something
    model = build_model(
        ModelConfig(
            name="deit_tiny_distilled_patch16_224",
            img_size=16,
            patch_size=4,
            token_head=True,
            kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
        ),
        3,
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    plain = model(x)
    nothing = model(x, token_mix=TokenMix(mask=torch.zeros(2, 16, dtype=torch.bool), partner=torch.tensor([1, 0])))
    assert torch.allclose(plain.logits, nothing.logits, atol=1e-6) and torch.allclose(plain.token_logits, nothing.token_logits, atol=1e-6)
    everything = model(x, token_mix=TokenMix(mask=torch.tensor([[True] * 16, [False] * 16]), partner=torch.tensor([1, 0])))
    assert torch.allclose(everything.logits[0], plain.logits[1], atol=1e-5)  # sample 0 now sees only sample 1's patches
    assert torch.allclose(everything.logits[1], plain.logits[1], atol=1e-6)


def make_teacher_prediction(n, tokens, labels_cls):
    return TeacherPrediction(probs=labels_cls, token_probs=tokens)


@pytest.mark.parametrize("beta", [0.5, 0.0, 2.0])
def test_token_label_loss_is_its_equation_and_mixtoken_mixes_targets_consistently(beta):
    torch.manual_seed(0)
    objective = Objective([{"term": "token_label", "beta": beta, "cls_target": "mix", "cls_mix": 0.25}], C, has_dist_head=False)
    batch = batch_of([0, 2])
    logits, token_logits = torch.randn(2, C), torch.randn(2, 4, C)
    token_targets = torch.softmax(torch.randn(2, 4, C), -1)
    crop = torch.softmax(torch.randn(2, C), -1)
    teacher = TeacherPrediction(probs=crop, token_probs=token_targets)

    def ce(x, y):
        return -(y * torch.log_softmax(x, -1)).sum(-1)

    onehot = torch.eye(C)[torch.tensor([0, 2])]
    y_cls = 0.75 * onehot + 0.25 * crop
    loss, _ = objective(ModelOutput(logits, token_logits=token_logits, tokens=torch.zeros(2, 5, 1), num_prefix=1), batch, teacher)
    expected = ce(logits, y_cls).mean() + beta * ce(token_logits, token_targets).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    mask = torch.tensor([[True, False, False, False], [False, False, False, False]])
    mix = TokenMix(mask=mask, partner=torch.tensor([1, 0]))
    loss, _ = objective(
        ModelOutput(logits, token_logits=token_logits, tokens=torch.zeros(2, 5, 1), num_prefix=1, token_mix=mix), batch, teacher
    )
    mixed_tokens = token_targets.clone()
    mixed_tokens[0, 0] = token_targets[1, 0]  # the token taken from the partner takes its target
    mixed_cls = y_cls.clone()
    mixed_cls[0] = 0.75 * y_cls[0] + 0.25 * y_cls[1]  # by the mask's mean (1 of 4 tokens)
    expected = ce(logits, mixed_cls).mean() + beta * ce(token_logits, mixed_tokens).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------ label maps end to end
@pytest.fixture(scope="module")
def label_maps(tmp_path_factory, tiny_teacher):
    folder = tmp_path_factory.mktemp("maps") / "maps"
    cfg = load_recipe(
        "demo_student_distilled",
        tiny_run(folder / "unused", f"teacher.checkpoint={tiny_teacher}", f"labelmaps.path={folder}", "labelmaps.k=3"),
    )
    write_label_maps(cfg)
    return folder


TOKEN_RUN = [*TINY_DEIT, "model.token_head=true", "augment.cutmix_alpha=1.0", "objective=[{term: token_label, mixtoken: true}]"]


def test_label_map_files(label_maps):
    manifest = LabelMapManifest.read(label_maps)
    assert manifest.grid == [2, 2] and manifest.k == 3 and manifest.count == 256  # the tiny CNN maps 8x8 to 2x2
    records = np.memmap(label_maps / "labelmaps.bin", dtype=manifest.dtype, mode="r")
    assert records["ids"].shape == (256, 2, 2, 3) and (np.diff(records["scores"].astype(np.float32), axis=-1) <= 0).all()


def test_training_with_token_labels_and_mixtoken(label_maps, tmp_path):
    result = train(
        load_recipe(
            "demo_student_distilled", tiny_run(tmp_path / "deit", *TOKEN_RUN, f"teacher.label_maps={label_maps}", "teacher.checkpoint=null")
        )
    )
    first, last = result.history
    assert last["train_token_label@cls"] < first["train_token_label@cls"]  # (16 steps: too few for accuracy above chance)
    lvvit = [
        "model.name=lvvit_tiny",
        "model.img_size=8",
        "model.patch_size=2",
        "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "model.token_head=false",
    ]
    result = train(
        load_recipe(
            "demo_student", tiny_run(tmp_path / "lvvit", *TOKEN_RUN, *lvvit, f"teacher.label_maps={label_maps}", "teacher.checkpoint=null")
        )
    )
    first, last = result.history
    assert last["train_token_label"] < first["train_token_label"]


def test_label_maps_are_checked(label_maps, tmp_path):
    base = ["teacher.checkpoint=null", f"teacher.label_maps={label_maps}", *TOKEN_RUN]
    with pytest.raises(UserError, match="dataset.count"):
        train(load_recipe("demo_student", tiny_run(tmp_path / "a", *base, "data.train_limit=200")))
    randaug = train(load_recipe("demo_student", tiny_run(tmp_path / "b", *base, "augment.rand_augment=rand-m9-mstd0.5-inc1")))
    assert randaug.history[-1]["train_loss"] > 0  # RandAugment with label maps: the targets follow the warps (test_full_images)
    with pytest.raises(ConfigError, match="token_head"):
        train(load_recipe("demo_student", tiny_run(tmp_path / "c", *base, "model.token_head=false")))
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(label_maps, damaged)
    data = bytearray((damaged / "labelmaps.bin").read_bytes())
    data[7] ^= 1
    (damaged / "labelmaps.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        train(load_recipe("demo_student", tiny_run(tmp_path / "d", *base[:-1], f"teacher.label_maps={damaged}", TOKEN_RUN[-1])))


def test_labelmaps_command(tmp_path, tiny_teacher, capsys):
    args = tiny_run(tmp_path / "unused", f"teacher.checkpoint={tiny_teacher}", f"labelmaps.path={tmp_path / 'maps'}")
    assert main(["labelmaps", "demo_student_distilled", *args]) == 0
    assert "2x2 locations, top-5" in capsys.readouterr().out
    assert LabelMapManifest.read(tmp_path / "maps").k == 5
