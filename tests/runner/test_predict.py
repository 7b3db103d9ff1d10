"""``vitdistill predict``: a run, its timm export and its ONNX export give the same top-k on the same
images (portrait, over-wide, greyscale), with the evaluation's own view; bad files are one line each."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from PIL import Image

from vitdistill import load_recipe, predict, train
from vitdistill.augment import Augmenter
from vitdistill.cli import main
from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import open_source
from vitdistill.export import export_run
from vitdistill.inference import EXIT_SOME_BAD, open_predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # mean != std: an export writing one for the other shows
CROP = 0.75  # evaluation centre crop < 1: a view that ignored it shows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    overrides = [
        *TINY_DEIT,
        f"data.mean=[{','.join(map(str, MEAN))}]",
        f"data.std=[{','.join(map(str, STD))}]",
        f"augment.eval_crop_pct={CROP}",
        "optim.epochs=1",
    ]
    train(load_recipe("demo_student", tiny_run(out, *overrides)))
    export_run(out, "timm")
    export_run(out, "onnx")
    return out


@pytest.fixture(scope="module")
def images(run, tmp_path_factory) -> Path:
    """Digits as PNG files, a portrait, an over-wide, a greyscale image, a corrupt file, and a folder below."""
    folder = tmp_path_factory.mktemp("images")
    digits = open_source(DataConfig(source="digits"), "test", 6).images.numpy()
    for i in range(4):
        Image.fromarray(digits[i]).save(folder / f"digit{i}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (21, 9, 3), dtype=np.uint8)).save(folder / "portrait.png")
    Image.fromarray(rng.integers(0, 255, (7, 30, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (10, 13), dtype=np.uint8), mode="L").save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "sub").mkdir()
    Image.fromarray(digits[4]).save(folder / "sub" / "digit4.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def by_path(rows):
    return {Path(r.path).name: r for r in rows}


def test_run_timm_and_onnx_exports_agree(run, images):
    results = {}
    for name, model in [("run", run), ("timm", run / "export" / "timm"), ("onnx", run / "export" / "onnx" / "model.onnx")]:
        rows = predict(model, [images], top_k=3, batch_size=3, device="cpu")
        results[name] = by_path(rows)
        assert open_predictor(model).kind == {"run": "run", "timm": "timm export", "onnx": "onnx export"}[name]
    names = set(results["run"])
    assert names == {
        "digit0.png",
        "digit1.png",
        "digit2.png",
        "digit3.png",
        "digit4.png",
        "portrait.png",
        "wide.png",
        "grey.png",
        "broken.png",
    }
    assert results["run"]["broken.png"].error and not results["run"]["broken.png"].labels
    for name in names - {"broken.png"}:
        ref = results["run"][name]
        assert ref.error is None and len(ref.labels) == 3 and ref.probabilities == sorted(ref.probabilities, reverse=True)
        for other in ("timm", "onnx"):
            row = results[other][name]
            assert row.labels == ref.labels, (other, name)
            assert np.allclose(row.probabilities, ref.probabilities, atol=1e-4), (other, name)


def test_predictions_are_the_evaluation_view(run, images):
    """A digit written to a PNG is predicted from the very view `vitdistill eval` makes of it."""
    predictor = open_predictor(run)
    assert (predictor.crop_pct, predictor.mean, predictor.std) == (CROP, MEAN, STD)
    source = open_source(DataConfig(source="digits"), "test", 6)
    views = Augmenter(source, AugmentConfig(input_size=8, eval_crop_pct=CROP), 0, MEAN, STD, torch.device("cpu"))
    with torch.no_grad():
        probs = predictor.module(views.eval_batch(torch.arange(5)).images).inference().softmax(1)
    rows = by_path(predict(run, [images / f"digit{i}.png" for i in range(4)] + [images / "sub" / "digit4.png"], top_k=10, device="cpu"))
    for i in range(5):
        row = rows[f"digit{i}.png"]
        expected = probs[i].sort(descending=True)
        assert row.labels == [predictor.classes[j] for j in expected.indices.tolist()]
        assert np.allclose(row.probabilities, expected.values.tolist(), atol=1e-6)


def test_over_wide_image_is_cropped_from_the_centre(run, tmp_path):
    """An over-wide image whose centre is a digit and whose sides are noise predicts as the digit alone would."""
    digit = open_source(DataConfig(source="digits"), "test", 1).images.numpy()[0]  # 8x8
    noise = np.random.default_rng(1).integers(0, 255, (8, 40, 3), dtype=np.uint8)
    wide = noise.copy()
    wide[:, 16:24] = digit
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(digit).save(tmp_path / "digit.png")
    # crop_pct=1 and an 8-pixel-high image: the centre crop of the short side is exactly the middle 8 columns
    predictor = open_predictor(run)
    predictor.crop_pct = 1.0
    rows = by_path(predict(predictor, [tmp_path], top_k=10, device="cpu"))
    assert rows["wide.png"].labels == rows["digit.png"].labels
    assert np.allclose(rows["wide.png"].probabilities, rows["digit.png"].probabilities, atol=1e-6)


def test_cli_csv_jsonl_archive_and_exit_codes(run, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(images), "--top-k", "99", "--output", str(out), "--device", "cpu"]) == EXIT_SOME_BAD
    err = capsys.readouterr().err
    assert sum("broken.png" in line for line in err.splitlines()) == 1 and "predicted 8 images" in err
    table = list(csv.reader(out.open()))
    assert table[0][:3] == ["path", "label_1", "probability_1"] and len(table[0]) == 1 + 2 * 10  # top-k clamped to 10 classes
    assert len(table) == 1 + 8
    assert abs(sum(float(x) for x in table[1][2::2]) - 1.0) < 1e-4  # all ten classes: probabilities sum to 1
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(images / "digit0.png", "a/digit0.png")
        tf.add(images / "grey.png", "b/grey.png")
    assert main(["predict", str(run / "export" / "onnx"), str(archive), "--format", "jsonl", "--top-k", "2", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [f"{archive}:a/digit0.png", f"{archive}:b/grey.png"]
    assert all(len(line["labels"]) == 2 == len(line["probabilities"]) for line in lines)
    assert main(["predict", str(tmp_path / "missing"), str(images)]) == 2


def test_eval_reads_an_onnx_export(run, capsys):
    assert main(["eval", str(run / "export" / "onnx" / "model.onnx"), "--data", "digits", "data.eval_limit=64", "--device", "cpu"]) == 0
    onnx_out = capsys.readouterr().out
    assert main(["eval", str(run), "--data", "digits", "data.eval_limit=64", "--device", "cpu"]) == 0
    run_out = capsys.readouterr().out

    def top1(text):
        return next(line for line in text.splitlines() if line.strip().startswith("top1"))

    assert top1(onnx_out) == top1(run_out)


def test_exports_keep_std_apart_from_mean(run):
    config = json.loads((run / "export" / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert tuple(config["mean"]) == MEAN and tuple(config["std"]) == STD and config["crop_pct"] == CROP
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(run / "export" / "onnx" / "model.onnx")).metadata_props}
    assert tuple(json.loads(meta["mean"])) == MEAN and tuple(json.loads(meta["std"])) == STD


def test_hf_dataset_input(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    digits = open_source(DataConfig(source="digits"), "test", 5).images.numpy()
    buffers = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(digits[i]).save(buf, format="PNG")
        buffers.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": buffers, "label": [0, 1, 2]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hfds"))
    Image.fromarray(digits[1]).save(tmp_path / "one.png")
    rows = predict(run, [tmp_path / "hfds", tmp_path / "one.png"], top_k=2, device="cpu")
    assert [r.path for r in rows] == [f"{tmp_path / 'hfds'}/test row {i}" for i in range(3)] + [str(tmp_path / "one.png")]
    assert rows[1].labels == rows[3].labels and np.allclose(rows[1].probabilities, rows[3].probabilities, atol=1e-6)


def test_mixed_size_centre_crops_at_crop_pct_below_one():
    """Per-sample (mixed-size) evaluation boxes: the centred square of crop_pct x the short side."""
    from vitdistill.augment.geometry import centre_boxes

    boxes = centre_boxes(2, torch.tensor([10, 30]), torch.tensor([40, 12]), "cpu", crop_pct=0.5)
    assert boxes.tolist() == [[17.5, 2.5, 22.5, 7.5], [3.0, 12.0, 9.0, 18.0]]
