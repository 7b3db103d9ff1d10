"""`vitdistill eval` checks what it is given: the data's class names against the run's (issue 19,
case 2), and `--data` keeps the run's split names and reads Hugging Face folders (case 10)."""

from __future__ import annotations

import json

import pytest
from conftest import CACHE, tiny_run
from PIL import Image

from vitdistill.cli import main
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.run_folder import data_config_for


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalcheck") / "run"
    assert main(["train", "demo_teacher", *tiny_run(out, "model.name=vitdistill_convnet_tiny", "optim.epochs=1")]) == 0
    return out


def digits_folder(root, split="test", rename=None, drop=None, extra=None):
    """The first 40 test digits as an ImageFolder ``root/split/<class>/``, a class renamed, dropped or added."""
    source = open_source(DataConfig(source="digits"), "test", 40)
    for i, (image, label) in enumerate(zip(source.images.numpy(), source.labels.tolist())):
        name = source.classes[label]
        if name == drop:
            continue
        name = (rename or {}).get(name, name)
        (root / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / split / name / f"{i}.png")
    if extra:
        (root / split / extra).mkdir(parents=True)
        Image.fromarray(source.images.numpy()[0]).save(root / split / extra / "x.png")
    return root


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rename": {"3": "zebra"}}, "the model's 3 not in the data; the data's zebra unknown to the model"),
        ({"drop": "7", "extra": "x"}, "the model's 7 not in the data; the data's x unknown to the model"),
    ],
)
def test_eval_names_the_class_difference(run, tmp_path, capsys, change, words):
    folder = digits_folder(tmp_path / "data", **change)
    assert main(["eval", str(run), "--data", str(folder), f"data.cache_dir={CACHE}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--ignore-class-names" in err


def test_same_names_in_another_order_are_named():
    from vitdistill.errors import UserError
    from vitdistill.runner import check_class_names

    with pytest.raises(UserError, match=r"same names in another order \(b, a moved\)"):
        check_class_names(["a", "b", "c"], ["b", "a", "c"], "hf:x/test")
    check_class_names(["a", "b"], ["a", "b"], "hf:x/test")


def test_eval_with_the_same_names_and_ignore_flag(run, tmp_path, capsys):
    folder = digits_folder(tmp_path / "same")
    assert main(["eval", str(run), "--data", str(folder), f"data.cache_dir={CACHE}", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 40
    renamed = digits_folder(tmp_path / "renamed", rename={"3": "zebra"})
    assert main(["eval", str(run), "--data", str(renamed), f"data.cache_dir={CACHE}", "--ignore-class-names"]) == 0


def test_data_keeps_the_run_split_and_reads_hf_folders(tmp_path):
    recipe = {"data": {"source": "hf", "root": "/elsewhere", "eval_split": "validation", "image_column": "img", "label_column": "fine"}}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["validation"]}')
    cfg = data_config_for(recipe, str(tmp_path / "hf"), [])
    assert (cfg.source, cfg.root, cfg.eval_split, cfg.image_column, cfg.label_column) == (
        "hf",
        str(tmp_path / "hf"),
        "validation",
        "img",
        "fine",
    )
    (tmp_path / "pq" / "data").mkdir(parents=True)
    (tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet").write_bytes(b"")
    assert data_config_for(recipe, str(tmp_path / "pq"), []).source == "hf"
    (tmp_path / "folder" / "validation").mkdir(parents=True)
    cfg = data_config_for(recipe, str(tmp_path / "folder"), [])
    assert (cfg.source, cfg.eval_split) == ("imagefolder", "validation")  # not the default "test"


def test_eval_on_a_folder_uses_the_run_eval_split(run, tmp_path, capsys):
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["eval_split"] = "val"
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    (other / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    folder = digits_folder(tmp_path / "data", split="val")
    assert main(["eval", str(other), "--data", str(folder), f"data.cache_dir={CACHE}"]) == 0
    assert "/val" in capsys.readouterr().out


def test_a_model_without_recorded_class_names_is_compared_by_count_only(tmp_path):
    """An export written without class names (older vitdistill, or a bare state dict) is not refused."""
    from vitdistill.config import ModelConfig
    from vitdistill.models import build_model, export_model
    from vitdistill.runner import evaluate_checkpoint

    model = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 10, input_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    assert model.spec.classes == []
    export_model(model, tmp_path / "model.safetensors")
    folder = digits_folder(tmp_path / "data", rename={"3": "zebra"})  # names a model with recorded names would refuse
    result = evaluate_checkpoint(tmp_path / "model.safetensors", str(folder), None, [f"data.cache_dir={CACHE}"], device="cpu")
    assert result["images"] == 40
