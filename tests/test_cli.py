"""The command line end to end: train, eval --json, demo --json, recipes, config."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import yaml
from conftest import CACHE, TINY_DEIT, tiny_run

from vitdistill.cli import main
from vitdistill.demo import run_demo


def test_train_then_eval_with_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "demo_student", *tiny_run(out, *TINY_DEIT)]) == 0
    assert (out / "model.safetensors").is_file()
    history_top1 = float(list(csv.DictReader(open(out / "metrics.csv")))[-1]["eval_top1"])
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 128 and result["data"] == "digits/test"
    assert abs(result["top1"] - history_top1) < 1e-6  # eval reproduces the run's own last evaluation
    assert {"top1_cls", "top1_dist", "top1_mean", "top5"} <= set(result)
    printed = capsys.readouterr().out
    assert "top1_dist" in printed
    # the checkpoint file and another split work too
    assert main(["eval", str(out / "checkpoint.pt"), "--split", "train", "--json", str(tmp_path / "train.json")]) == 0
    assert json.loads((tmp_path / "train.json").read_text())["data"] == "digits/train"


def test_eval_rejects_data_with_other_classes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "demo_teacher", *tiny_run(out, "model.name=vitdistill_convnet_tiny", "optim.epochs=1")]) == 0
    folder = tmp_path / "two_classes" / "test"
    from PIL import Image

    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / name / "0.png")
    assert main(["eval", str(out), "--data", str(tmp_path / "two_classes"), f"data.cache_dir={CACHE}"]) == 2
    assert "the data's a, b unknown to the model" in capsys.readouterr().err  # names first (issue 19, case 2)
    assert main(["eval", str(out), "--data", str(tmp_path / "two_classes"), f"data.cache_dir={CACHE}", "--ignore-class-names"]) == 2
    assert "predicts 10 classes" in capsys.readouterr().err


def test_demo_runs_all_three_stages(tmp_path):
    shrink = ("optim.epochs=2", "data.train_limit=256", "data.eval_limit=64")
    result = run_demo(tmp_path / "demo", shrink)
    assert set(result["runs"]) == {"teacher", "student", "distilled"}
    assert result["runs"]["distilled"]["model"] == "deit_tiny_distilled_patch16_224"
    for name, run in result["runs"].items():
        losses = [float(row["train_loss"]) for row in csv.DictReader(open(tmp_path / "demo" / name / "metrics.csv"))]
        assert losses[1] < losses[0], name  # every stage learns
        assert run["top1"] == float(list(csv.DictReader(open(tmp_path / "demo" / name / "metrics.csv")))[-1]["eval_top1"])
    distilled = yaml.safe_load((tmp_path / "demo" / "distilled" / "config.yaml").read_text())
    assert distilled["teacher"]["checkpoint"] == str(
        (tmp_path / "demo" / "teacher" / "model.safetensors").resolve()
    )  # stage 3 learns from stage 1
    assert result["distillation_gain"] == result["runs"]["distilled"]["top1"] - result["runs"]["student"]["top1"]
    run_demo(tmp_path / "demo", shrink)  # a second demo in the same folder starts afresh


def test_console_script_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vitdistill", "recipes"], capture_output=True, text=True, check=True)
    assert "deit_tiny_distilled_cifar10" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "vitdistill", "config", "demo_teacher", "optim.epochs=3"], capture_output=True, text=True, check=True
    )
    assert "epochs: 3" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "vitdistill", "train", "demo_teacher", "optim.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "optim.nope" in bad.stderr
