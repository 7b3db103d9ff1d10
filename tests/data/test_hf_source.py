"""data.source: hf, offline: a tiny Hugging Face dataset built here (digits as PNG images with a
ClassLabel), saved with save_to_disk and as Hub-style parquet files."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run

datasets = pytest.importorskip("datasets")  # in the test extra

from vitdistill.cli import main  # noqa: E402
from vitdistill.config import DataConfig  # noqa: E402
from vitdistill.data import open_source  # noqa: E402
from vitdistill.errors import UserError  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits_hf(tmp_path_factory):
    """The digits train/test splits (first 200/60) as a DatasetDict: on disk and as parquet."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    splits = {}
    for split, count in (("train", 200), ("test", 60)):
        src = open_source(DataConfig(source="digits"), split)
        images = [Image.fromarray(src.images[i].numpy()) for i in range(count)]
        features = datasets.Features(
            {"picture": datasets.Image(), "digit": datasets.ClassLabel(names=NAMES), "name": datasets.Value("string")}
        )
        labels = src.labels[:count].tolist()
        splits[split] = datasets.Dataset.from_dict(
            {"picture": images, "digit": labels, "name": [NAMES[y] for y in labels]}, features=features
        )
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(root / "disk"))
    for split, ds in dd.items():
        ds.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("layout", ["disk", "parquet"])
def test_hf_split_decodes_in_dataset_order_with_classlabel_names(digits_hf, layout, tmp_path):
    cfg = DataConfig(source="hf", root=str(digits_hf / layout), image_column="picture", label_column="digit", cache_dir=str(tmp_path))
    source = open_source(cfg, "train")
    digits = open_source(DataConfig(source="digits"), "train")
    assert source.classes == NAMES and len(source) == 200 and source.name == f"hf:{layout}/train"
    assert torch.equal(source.images, digits.images[:200]) and torch.equal(source.labels, digits.labels[:200])  # row i is index i
    assert len(list((tmp_path / "decoded").glob("hf-*.npy"))) == 1  # decoded once into the cache ...
    again = open_source(cfg, "train")
    assert torch.equal(again.images, source.images) and again.items_hash == source.items_hash  # ... and read back
    part = open_source(cfg, "train", limit=30)  # class-balanced slice, still in dataset order
    assert len(part) == 30 and torch.bincount(part.labels, minlength=10).min() == 3
    # string labels: their sorted set are the classes
    named = open_source(
        DataConfig(source="hf", root=str(digits_hf / layout), image_column="picture", label_column="name", cache_dir=str(tmp_path)), "test"
    )
    assert named.classes == sorted(NAMES)
    assert [named.classes[y] for y in named.labels] == [NAMES[y] for y in open_source(cfg, "test").labels]


def test_hf_errors_name_the_key(digits_hf, tmp_path):
    base = {"source": "hf", "root": str(digits_hf / "disk"), "image_column": "picture", "label_column": "digit", "cache_dir": str(tmp_path)}
    with pytest.raises(UserError, match=r"data.image_column: .* no column 'image'"):
        open_source(DataConfig(**{**base, "image_column": "image"}), "train")
    with pytest.raises(UserError, match=r"has splits \['test', 'train'\], not 'validation'"):
        open_source(DataConfig(**base), "validation")
    with pytest.raises(UserError, match="not an Image feature"):
        open_source(DataConfig(**{**base, "image_column": "name"}), "train")
    with pytest.raises(UserError, match=r"parquet files under .* have splits \['test', 'train'\], not 'validation'"):  # as a DatasetDict
        open_source(DataConfig(**{**base, "root": str(digits_hf / "parquet")}), "validation")
    datasets.load_from_disk(str(digits_hf / "disk"))["train"].save_to_disk(str(tmp_path / "single"))
    with pytest.raises(UserError, match="without split names"):
        open_source(DataConfig(**{**base, "root": str(tmp_path / "single")}), "train")


def test_training_from_an_hf_dataset_from_the_cli(digits_hf, tmp_path, capsys):
    data = ["data.source=hf", f"data.root={digits_hf / 'parquet'}", "data.image_column=picture", "data.label_column=digit"]
    out = tmp_path / "run"
    assert main(["train", "demo_teacher", *tiny_run(out, "model.name=vitdistill_convnet_tiny", "optim.epochs=1", *data)]) == 0
    assert "hf:parquet/train: 200 images 8x8, 10 classes" in capsys.readouterr().out
    assert main(["train", "demo_teacher", *tiny_run(tmp_path / "bad", "data.source=hf")]) == 2
    assert "data.root: hf needs a root" in capsys.readouterr().err
