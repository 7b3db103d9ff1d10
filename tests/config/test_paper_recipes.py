"""The packaged paper recipes at 224x224 (ImageNet layout): each validates, pins the paper's
settings, and each family trains two steps on a handful of synthetic JPEGs of mixed sizes on
the CPU, with the recipe's own data path, views and objective (only the model is shrunk, the
teacher replaced by a tiny random one, and the batch made small)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT
from PIL import Image
from safetensors.torch import save_file

from vitdistill import list_recipes, load_recipe, train
from vitdistill.cli import main
from vitdistill.errors import RecipeWarning
from vitdistill.labelmaps import write_label_maps
from vitdistill.models import build_model, load_model
from vitdistill.store import write_store

DEIT = ["deit_tiny_imagenet", "deit_small_imagenet", "deit_base_imagenet"]
DEIT_DISTILLED = ["deit_tiny_distilled_imagenet", "deit_small_distilled_imagenet", "deit_base_distilled_imagenet"]
TINY_VIT = ["tiny_vit_store_imagenet21k"] + [
    f"tiny_vit_{m}_{stage}" for m in ("5m", "11m", "21m") for stage in ("pretrain_imagenet21k", "finetune_imagenet")
]
LVVIT = ["nfnet_labelmaps_imagenet", "lvvit_tiny_imagenet", "lvvit_small_imagenet", "lvvit_medium_imagenet"]
FD_PAIRS = [
    f"fd_{stage}_{pair}"
    for pair in ("dino_vit_base", "deit_vit_base", "clip_vit_base", "clip_vit_large")
    for stage in ("pretrain", "finetune")
]
PAPER_RECIPES = (
    DEIT + DEIT_DISTILLED + TINY_VIT + LVVIT + ["deit_small_diverse_imagenet", "fd_pretrain_imagenet", "fd_finetune_imagenet"] + FD_PAIRS
)


# ---------------------------------------------------------------------------- validation
def test_every_paper_recipe_is_packaged_and_validates_without_warnings():
    assert set(PAPER_RECIPES) <= set(list_recipes())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # no setting that does nothing
        for name in PAPER_RECIPES:
            cfg = load_recipe(name)
            assert cfg.name == name
            assert cfg.augment.input_size == 224 and cfg.data.source == "imagefolder", name
            assert cfg.data.root is not None and cfg.data.eval_split == "val" and cfg.data.source_size == 256, name


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_header_cites_the_paper_and_gives_the_command(name):
    text = (ROOT / "src" / "vitdistill" / "recipes" / f"{name}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "arXiv" in header or name == "fd_finetune_imagenet", name  # the paper
    assert f"vitdistill train {name}" in header or f"vitdistill cache {name}" in header or f"vitdistill labelmaps {name}" in header, name
    if name not in ("tiny_vit_store_imagenet21k", "nfnet_labelmaps_imagenet") and not name.startswith("fd_"):
        assert "top-1" in header, name  # the expected accuracy (or that it is not confirmed)


def test_deit_recipes_are_the_papers_table_9():
    for name in DEIT + DEIT_DISTILLED + ["deit_small_diverse_imagenet"]:
        cfg = load_recipe(name)
        o, a = cfg.optim, cfg.augment
        assert (o.epochs, o.batch_size, o.opt, o.weight_decay, o.warmup_epochs, o.clip_grad) == (300, 1024, "adamw", 0.05, 5, None), name
        assert o.lr * o.batch_size / o.lr_base_batch == pytest.approx(5e-4 * 1024 / 512), name  # 5e-4 x batch/512
        assert (a.rand_augment, a.mixup_alpha, a.cutmix_alpha, a.erase_prob, a.repeats) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 3), name
        assert (a.crop, a.scale, a.hflip, a.eval_crop_pct) == ("rrc", (0.08, 1.0), 0.5, 0.875), name
        assert cfg.model.drop_path == 0.1, name
        assert cfg.objective[0] == {
            "term": "ce",
            "weight": 0.5 if "distilled" in name else 1.0,
            "head": "cls" if "distilled" in name else "auto",
            "smoothing": 0.1,
        }
    for name in DEIT_DISTILLED:
        cfg = load_recipe(name)
        assert cfg.model.name.endswith("_distilled_patch16_224") and cfg.teacher.name == "regnety_160" and cfg.teacher.weights
        assert cfg.objective[1] == {"term": "kd_hard", "weight": 0.5, "head": "dist", "smoothing": 0.0}


def test_tiny_vit_recipes_are_the_official_configs():
    store = load_recipe("tiny_vit_store_imagenet21k")
    assert (store.store.k, store.optim.epochs, store.augment.mixup_alpha, store.augment.cutmix_alpha) == (100, 90, 0.0, 0.0)
    assert store.teacher.name == "vit_large_patch14_clip_224" and timm.is_model(store.teacher.name)
    assert store.teacher.mean == (0.48145466, 0.4578275, 0.40821073)
    for m, drop_path in (("5m", 0.0), ("11m", 0.0), ("21m", 0.1)):
        pre = load_recipe(f"tiny_vit_{m}_pretrain_imagenet21k")
        assert pre.objective == [{"term": "kd_soft", "weight": 1.0, "head": "auto", "tau": 1.0, "normalization": "batchmean"}]  # label-free
        assert pre.teacher.store == store.store.path and pre.augment == store.augment and pre.data == store.data and pre.seed == store.seed
        o = pre.optim
        assert (o.epochs, o.weight_decay, o.warmup_epochs, o.clip_grad, pre.model.drop_path) == (90, 0.01, 5, 5.0, drop_path)
        assert o.lr * o.batch_size / o.lr_base_batch == pytest.approx(2e-3)  # 2.5e-4 x 4096/512
        fine = load_recipe(f"tiny_vit_{m}_finetune_imagenet")
        o = fine.optim
        assert (o.epochs, o.layer_decay, o.weight_decay, o.clip_grad, fine.model.freeze_bn, fine.model.drop_path) == (
            30,
            0.8,
            1e-8,
            5.0,
            True,
            drop_path,
        )
        assert o.lr * o.batch_size / o.lr_base_batch == pytest.approx(5e-4)  # 2.5e-4 x 1024/512
        assert fine.model.init == f"runs/tiny_vit_{m}_pretrain_imagenet21k/model.safetensors" and fine.teacher is None


def test_lvvit_recipes_are_the_reference_settings():
    for name, drop_path, crop in (
        ("lvvit_tiny_imagenet", 0.1, 0.9),
        ("lvvit_small_imagenet", 0.1, 0.9),
        ("lvvit_medium_imagenet", 0.2, 1.0),
    ):
        cfg = load_recipe(name)
        assert cfg.model.eval_head == "lvvit_aux" and cfg.model.drop_path == drop_path and cfg.augment.eval_crop_pct == crop
        assert cfg.objective == [
            {
                "term": "token_label",
                "weight": 1.0,
                "head": "auto",
                "beta": 1.0,
                "cls_target": "teacher",
                "cls_mix": 0.5,
                "smoothing": 0.0,
                "mixtoken": True,
                "mixtoken_box": "batch",
            }
        ]
        assert cfg.teacher.label_map_mode == "zero_filled" and cfg.teacher.label_maps == "runs/labelmaps/nfnet_f6_imagenet_k5"
        assert cfg.augment.rand_augment == "rand-m9-mstd0.5-inc1" and cfg.augment.mixup_alpha == 0.0 and cfg.augment.cutmix_alpha == 0.0
        assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.batch_size, cfg.optim.epochs) == (1.6e-3, 1024, 1024, 300)
    maps = load_recipe("nfnet_labelmaps_imagenet")
    assert (maps.teacher.name, maps.teacher.input_size, maps.labelmaps.k, maps.teacher.label_maps) == ("dm_nfnet_f6", 576, 5, None)
    assert timm.is_model("dm_nfnet_f6")


def test_diverse_recipe_uses_the_papers_forms():
    cfg = load_recipe("deit_small_diverse_imagenet")
    terms = {t["term"]: t for t in cfg.objective}
    assert terms["patch_cosine"]["absolute"] is False and terms["patch_contrast"]["form"] == "paper" and cfg.model.token_head


# the official code's configs (configs/pretrain/fd_pretrain__*__img224__300ep.yaml, configs/finetune/...): drop path,
# and for fine-tuning the lr (at batch 512), layer decay, epochs, warmup epochs, warmup/min lr (at batch 512)
FD_PRETRAIN = {
    "dino_vit_base": ("vit_base_patch16_224.dino", "beit_base_patch16_224", 16, 768, 12, 12, 0.3),
    "deit_vit_base": ("deit_base_patch16_224.fb_in1k", "beit_base_patch16_224", 16, 768, 12, 12, 0.3),
    "clip_vit_base": ("vit_base_patch16_clip_224.openai", "beit_base_patch16_224", 16, 768, 12, 12, 0.2),
    "clip_vit_large": ("vit_large_patch14_clip_224.openai", "beit_large_patch16_224", 14, 1024, 24, 16, 0.3),
}
FD_FINETUNE = {
    "dino_vit_base": (0.2, 1.5e-3, 0.6, 100, 20, 2.5e-7),
    "deit_vit_base": (0.3, 1.25e-3, 0.65, 100, 20, 2.5e-7),
    "clip_vit_base": (0.3, 1.25e-3, 0.6, 100, 20, 2.5e-7),
    "clip_vit_large": (0.4, 2.5e-4, 0.75, 50, 5, 5e-7),
}


@pytest.mark.parametrize("pair", list(FD_PRETRAIN))
def test_fd_recipes_are_the_official_configs(pair):
    scale = 2048 / 512  # the reference scales lr, warmup lr and min lr by batch / 512 (16 GPUs x 128)
    teacher_name, student, patch, width, depth, heads, drop_path = FD_PRETRAIN[pair]
    pre = load_recipe(f"fd_pretrain_{pair}")
    o, m, t = pre.optim, pre.model, pre.teacher
    assert (t.name, t.feature_layer, t.feature_norm) == (teacher_name, -1, True)  # PRED_FEAT_AFTERNORM: True
    assert t.weights == f"weights/{teacher_name}.safetensors"
    assert (m.name, m.img_size, m.patch_size, m.drop_path, m.init_truncation) == (student, 224, patch, drop_path, 1.0)
    assert {k: m.kwargs[k] for k in ("embed_dim", "depth", "num_heads", "init_values")} == {
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "init_values": 0.1,
    }
    assert (m.kwargs["use_abs_pos_emb"], m.kwargs["use_rel_pos_bias"], m.kwargs["use_shared_rel_pos_bias"]) == (False, False, True)
    assert pre.objective == [
        {"term": "feature", "weight": 1.0, "head": "auto", "beta": 2.0, "grid": "interpolate", "class_token": True, "eps": 1e-5}
    ]
    assert (o.epochs, o.batch_size, o.opt, o.weight_decay, o.warmup_epochs, o.clip_grad, o.layer_decay) == (
        300,
        2048,
        "adamw",
        0.05,
        10,
        3.0,
        None,
    )
    assert o.lr * o.batch_size / o.lr_base_batch == pytest.approx(3e-4 * scale)
    assert (o.warmup_lr, o.min_lr) == (pytest.approx(5e-7 * scale), pytest.approx(5e-6 * scale)) and o.decay_rel_pos_bias
    a = pre.augment
    assert (a.crop, tuple(a.scale), a.hflip, a.mixup_alpha, a.cutmix_alpha, a.rand_augment, a.color_jitter, a.erase_prob) == (
        "rrc",
        (0.08, 1.0),
        0.5,
        0.0,
        0.0,
        None,
        None,
        0.0,
    )

    drop_path, lr, layer_decay, epochs, warmup, floor = FD_FINETUNE[pair]
    fine = load_recipe(f"fd_finetune_{pair}")
    o, m, a = fine.optim, fine.model, fine.augment
    assert fine.teacher is None and fine.objective == [{"term": "ce", "weight": 1.0, "head": "auto", "smoothing": 0.1}]
    assert (m.name, m.patch_size, m.drop_path, m.init_truncation, m.init) == (
        student,
        patch,
        drop_path,
        None,
        f"runs/fd_pretrain_{pair}/model.safetensors",
    )
    assert (m.kwargs["embed_dim"], m.kwargs["use_rel_pos_bias"], m.kwargs["use_shared_rel_pos_bias"]) == (width, True, False)
    assert (o.epochs, o.batch_size, o.weight_decay, o.warmup_epochs, o.clip_grad, o.layer_decay) == (
        epochs,
        2048,
        0.05,
        warmup,
        5.0,
        layer_decay,
    )
    assert o.lr * o.batch_size / o.lr_base_batch == pytest.approx(lr * scale)
    assert (o.warmup_lr, o.min_lr) == (pytest.approx(floor * scale), pytest.approx(floor * scale))
    assert not o.layer_decay_scales_floor and o.decay_rel_pos_bias  # timm 0.4.12's scheduler; tables decayed
    assert (a.rand_augment, a.erase_prob, a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.switch_prob, a.eval_crop_pct) == (
        "rand-m9-mstd0.5-inc1",
        0.25,
        0.8,
        1.0,
        1.0,
        0.5,
        0.875,
    )


# ---------------------------------------------------------------------------- two steps each
SIZES = [(300, 200), (180, 260), (256, 256), (333, 250), (240, 320), (500, 375)]  # (width, height)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    """An ImageNet-layout folder of JPEGs of mixed sizes: 2 classes, 6 training and 2 validation
    images each (train/<class>/*.JPEG, val/<class>/*.JPEG). 12 training images in batches of 6
    make 2 steps, with or without repeated augmentation (a multiple of 3)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = SIZES[(i + 3 * c + (split == "val")) % len(SIZES)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = np.linspace(64, 255, w, dtype=np.uint8)[None, :]  # a class cue
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def tiny_teacher_weights(tmp_path_factory) -> Path:
    """A random RegNetY-200MF with a 2-class head, saved as a plain state dict: stands in for the
    recipes' large teachers (same loading path: teacher.name + teacher.weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "regnety_002.safetensors"
    save_file(timm.create_model("regnety_002", pretrained=False, num_classes=2).state_dict(), str(path))
    return path


def small_run(root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"data.cache_dir={cache}",
        f"output={out}",
        "optim.epochs=1",
        "optim.batch_size=6",
        "engine.device=cpu",
        "engine.eval_batch_size=4",
        "engine.tensorboard=false",
        *extra,
    ]


def teacher(weights: Path) -> list[str]:
    return ["teacher.name=regnety_002", f"teacher.weights={weights}"]


TINY_DEIT_224 = ["model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]


def check_trained(result, out: Path, steps: int = 2) -> None:
    row = result.final
    assert math.isfinite(row["train_loss"]) and "eval_top1" in row
    assert (out / "model.safetensors").is_file()
    assert row["train_steps"] == steps


@pytest.mark.parametrize("name", ["deit_tiny_imagenet", "deit_base_imagenet"])
def test_deit_trains_two_steps_at_224(name, imagenet_folder, tmp_path):
    out = tmp_path / "run"
    result = train(load_recipe(name, small_run(imagenet_folder, out, tmp_path / "cache", *TINY_DEIT_224)))
    check_trained(result, out)


def test_deit_distilled_trains_two_steps_at_224(imagenet_folder, tiny_teacher_weights, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(
        "deit_small_distilled_imagenet", small_run(imagenet_folder, out, tmp_path / "cache", *TINY_DEIT_224, *teacher(tiny_teacher_weights))
    )
    result = train(cfg)
    check_trained(result, out)
    assert {"eval_top1_cls", "eval_top1_dist"} <= set(result.final)  # two heads, evaluated by their mean


def test_deit_diverse_trains_two_steps_at_224(imagenet_folder, tmp_path):
    out = tmp_path / "run"
    result = train(load_recipe("deit_small_diverse_imagenet", small_run(imagenet_folder, out, tmp_path / "cache", *TINY_DEIT_224)))
    check_trained(result, out)
    assert all(math.isfinite(result.final[f"train_{t}"]) for t in ("ce", "patch_cosine", "patch_contrast", "patch_mix"))


TINY_TINY_VIT = ["model.kwargs={embed_dims: [16, 16, 16, 16], depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}"]


def test_tiny_vit_store_pretrain_and_finetune_at_224(imagenet_folder, tiny_teacher_weights, tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "store"
    common = [
        *teacher(tiny_teacher_weights),
        f"store.path={store}",
        "store.k=2",
        "store.batch_size=4",
        *TINY_TINY_VIT,
    ]  # k: the 2 classes here
    write_store(load_recipe("tiny_vit_store_imagenet21k", small_run(imagenet_folder, tmp_path / "cache_run", cache, *common)))
    assert (store / "manifest.json").is_file()
    pre = tmp_path / "pretrain"
    result = train(
        load_recipe("tiny_vit_5m_pretrain_imagenet21k", small_run(imagenet_folder, pre, cache, *common, f"teacher.store={store}"))
    )
    check_trained(result, pre)
    fine = tmp_path / "finetune"
    result = train(
        load_recipe("tiny_vit_5m_finetune_imagenet", small_run(imagenet_folder, fine, cache, *TINY_TINY_VIT, f"model.init={pre}"))
    )
    check_trained(result, fine)


TINY_LVVIT = ["model.kwargs={embed_dim: 32, depth: 1, num_heads: 2, stem_width: 8}"]


def lvvit_run(imagenet_folder: Path, weights: Path, tmp_path: Path, *extra: str):
    cache, maps = tmp_path / "cache", tmp_path / "maps"
    common = [*teacher(weights), *TINY_LVVIT]
    write_label_maps(
        load_recipe(
            "nfnet_labelmaps_imagenet",
            small_run(imagenet_folder, tmp_path / "maps_run", cache, *common, f"labelmaps.path={maps}", "labelmaps.batch_size=4"),
        )
    )
    assert (maps / "manifest.json").is_file()
    out = tmp_path / "run"
    result = train(
        load_recipe("lvvit_small_imagenet", small_run(imagenet_folder, out, cache, *common, f"teacher.label_maps={maps}", *extra))
    )
    check_trained(result, out)
    assert {"eval_top1", "eval_top1_cls"} <= set(result.final)  # LV-ViT's rule, and the class head alone


def test_lvvit_token_labeling_trains_two_steps_at_224(imagenet_folder, tiny_teacher_weights, tmp_path):
    lvvit_run(imagenet_folder, tiny_teacher_weights, tmp_path)


TINY_BEIT_224 = ["model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2"]


def test_feature_distillation_pair_at_224(imagenet_folder, tiny_teacher_weights, tmp_path):
    cache, pre, fine = tmp_path / "cache", tmp_path / "pretrain", tmp_path / "finetune"
    result = train(
        load_recipe("fd_pretrain_imagenet", small_run(imagenet_folder, pre, cache, *TINY_BEIT_224, *teacher(tiny_teacher_weights)))
    )
    check_trained(result, pre)
    result = train(load_recipe("fd_finetune_imagenet", small_run(imagenet_folder, fine, cache, *TINY_BEIT_224, f"model.init={pre}")))
    check_trained(result, fine)


TINY_VIT_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_dino_weights(tmp_path_factory) -> Path:
    """A random DINO ViT-B/16 shrunk to width 32 and one block, headless: the paper recipes'
    teacher by its timm name, with its class token and final norm (randomised: mean != 0, scale != 1)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0, **TINY_VIT_TEACHER)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.normal_(0.3, 0.5)
    path = tmp_path_factory.mktemp("dino") / "dino_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_feature_distillation_paper_pair_at_224_and_the_converted_model_keeps_its_outputs(imagenet_folder, tiny_dino_weights, tmp_path):
    cache, pre, fine = tmp_path / "cache", tmp_path / "pretrain", tmp_path / "finetune"
    dino = [f"teacher.weights={tiny_dino_weights}", "teacher.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
    result = train(load_recipe("fd_pretrain_dino_vit_base", small_run(imagenet_folder, pre, cache, *TINY_BEIT_224, *dino)))
    check_trained(result, pre)
    assert math.isfinite(result.final["train_feature"])
    cfg = load_recipe("fd_finetune_dino_vit_base", small_run(imagenet_folder, fine, cache, *TINY_BEIT_224, f"model.init={pre}"))
    distilled = load_model(pre / "model.safetensors").eval()
    converted = build_model(cfg.model, 2, input_size=224).eval()  # per-block tables, each a copy of the shared one
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = distilled(x), converted(x)
    assert torch.allclose(a.final_tokens, b.final_tokens, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)
    result = train(cfg)
    check_trained(result, fine)


def test_paper_recipe_runs_from_the_cli(imagenet_folder, tmp_path):
    out = tmp_path / "cli"
    args = small_run(imagenet_folder, out, tmp_path / "cache", *TINY_DEIT_224)
    assert main(["train", "deit_tiny_imagenet", *args]) == 0
    assert (out / "model.safetensors").is_file()
