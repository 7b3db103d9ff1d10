"""Recipes: packaged lookup, overrides, inheritance, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from vitdistill import ConfigError, UserError, list_recipes, load_recipe
from vitdistill.cli import main
from vitdistill.validate import config_from_dict


def test_packaged_recipes_all_validate():
    names = list_recipes()
    assert {"cnn_teacher_cifar10", "deit_tiny_cifar10", "deit_tiny_distilled_cifar10", "demo_teacher"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        assert cfg.name == name
        assert cfg.objective, name


def test_overrides_are_typed_and_nested():
    cfg = load_recipe("deit_tiny_distilled_cifar10", ["optim.lr=5e-4", "optim.epochs=3", "augment.scale=[0.5, 1.0]", "data.root=/data/x"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3
    assert cfg.augment.scale == (0.5, 1.0)
    assert cfg.data.root == "/data/x"


def test_list_items_are_addressed_by_position():
    cfg = load_recipe("deit_tiny_distilled_cifar10", ["objective.1.weight=0.3", "objective.1.smoothing=0.1"])
    assert cfg.objective[1] == {"term": "kd_hard", "weight": 0.3, "head": "dist", "smoothing": 0.1}


def test_base_recipe_is_merged():
    cfg = load_recipe("deit_tiny_distilled_cifar10")
    assert cfg.model.name == "deit_tiny_distilled_patch16_224"  # its own
    assert cfg.model.patch_size == 4 and cfg.augment.mixup_alpha == 0.8  # from deit_tiny_cifar10
    assert cfg.data.mean == (0.4914, 0.4822, 0.4465)  # from cnn_teacher_cifar10


def test_user_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: demo_teacher\noptim:\n  epochs: 7\n")
    cfg = load_recipe(str(path))
    assert cfg.name == "mine" and cfg.optim.epochs == 7 and cfg.data.source == "digits"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("optim.lrr=1", "optim.lrr", "unknown key"),
        ("optim.lr=fast", "optim.lr", "expected a number"),
        ("optim.epochs=1.5", "optim.epochs", "expected an integer"),
        ("augment.crop=zoom", "augment.crop", "expected one of"),
        ("augment.hflip=2", "augment.hflip", "probability"),
        ("objective.0.term=nope", "objective.0.term", "unknown term"),
        ("objective.1.tau=3", "objective.1.tau", "unknown key"),  # kd_hard has no tau
        ("objective.1.head=both", "objective.1.head", "expected one of"),
        ("objective.5.weight=1", "objective.5", "no item 5"),
        ("data.records=zip", "data.records", "expected one of"),
        ("data.jpeg_quality=0", "data.jpeg_quality", "between 1 and 100"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_recipe("deit_tiny_distilled_cifar10", [override])
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_distilling_without_teacher_is_an_error():
    with pytest.raises(ConfigError, match="teacher"):
        config_from_dict({"objective": [{"term": "kd_soft"}]})


def test_unknown_recipe_lists_the_packaged_ones():
    with pytest.raises(UserError, match="deit_tiny_cifar10"):
        load_recipe("no_such_recipe")


def test_cli_reports_one_line_and_exit_code_2(capsys):
    code = main(["train", "demo_teacher", "optim.lr=fast"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "vitdistill: error: optim.lr: expected a number, got 'fast'"


def test_cli_rejects_a_stray_argument(capsys):
    assert main(["config", "demo_teacher", "oops"]) == 2
    assert "key=value" in capsys.readouterr().err


HARD_DISTILLATION = [  # DeiT: 1/2 CE(class head, y) + 1/2 CE(distillation head, argmax Z_t)
    {"term": "ce", "weight": 0.5, "head": "cls", "smoothing": 0.1},
    {"term": "kd_hard", "weight": 0.5, "head": "dist", "smoothing": 0.0},
]
PINNED_OBJECTIVES = {
    "deit_tiny_distilled_cifar10": HARD_DISTILLATION,
    "deit_tiny_store_cifar10": HARD_DISTILLATION,
    "demo_student_distilled": HARD_DISTILLATION,
    "deit_tiny_soft_cifar10": [  # (1 - lambda) CE + lambda tau^2 KL, lambda 1/2, tau 3
        {"term": "ce", "weight": 0.5, "head": "cls", "smoothing": 0.1},
        {"term": "kd_soft", "weight": 0.5, "head": "dist", "tau": 3.0, "normalization": "batchmean"},
    ],
    "tiny_vit_5m_store_cifar10": [
        {"term": "kd_soft", "weight": 1.0, "head": "auto", "tau": 1.0, "normalization": "batchmean"}
    ],  # label-free
    "deit_tiny_token_label_cifar10": [
        {
            "term": "token_label",
            "weight": 1.0,
            "head": "auto",
            "beta": 0.5,
            "cls_target": "label",
            "cls_mix": 0.5,
            "smoothing": 0.1,
            "mixtoken": True,
            "mixtoken_box": "sample",
        }
    ],
    "deit_tiny_diverse_cifar10": [
        {"term": "ce", "weight": 1.0, "head": "auto", "smoothing": 0.1},
        {"term": "patch_cosine", "weight": 0.1, "head": "auto", "absolute": True},
        {"term": "patch_contrast", "weight": 0.1, "head": "auto", "tau": 1.0, "detach_first": True, "form": "normalized"},
        {"term": "patch_mix", "weight": 0.1, "head": "auto", "smoothing": 0.0},
    ],
    "demo_student": [{"term": "ce", "weight": 1.0, "head": "auto", "smoothing": 0.1}],
}


@pytest.mark.parametrize("name", sorted(PINNED_OBJECTIVES))
def test_packaged_objectives_are_the_methods_equations(name):
    assert load_recipe(name).objective == PINNED_OBJECTIVES[name]
