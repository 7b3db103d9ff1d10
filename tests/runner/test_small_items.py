"""Issue 19, case 11: the small things a new user met (curves, compare, export mode, tensorboard,
scheduler warning, epoch line)."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from vitdistill.analysis.curves import format_comparison
from vitdistill.config import OptimConfig
from vitdistill.engine.curves import run_series
from vitdistill.engine.metrics import MetricsLog
from vitdistill.engine.optim import build_scheduler
from vitdistill.engine.trainer import epoch_line
from vitdistill.errors import RecipeWarning

ROW = {
    "epoch": 1,
    "train_loss": 2.5,
    "train_ce": 2.0,
    "train_steps": 40,
    "train_skipped_steps": 0,
    "train_time_s": 3.0,
    "train_img_per_s": 900.0,
    "lr": 1e-3,
    "eval_top1": 61.25,
    "eval_loss": 1.7,
    "ema_top1": 55.5,
}


def test_loss_panel_holds_losses_only():
    series = run_series([ROW, {**ROW, "epoch": 2}])
    assert sorted(series["loss"]) == ["eval_loss", "train_ce", "train_loss"]


def test_compare_names_runs_of_one_recipe_by_folder():
    base = {
        "name": "deit",
        "model": "deit_tiny",
        "parameters": 5e6,
        "epochs": 3,
        "final_top1": 50.0,
        "best_top1": 51.0,
        "best_epoch": 2,
        "final_ema_top1": None,
        "wall_time_s": 10.0,
        "train_img_per_s": 100.0,
    }
    table = format_comparison([{**base, "run": "runs/a"}, {**base, "run": "runs/b"}, {**base, "name": "other", "run": "runs/c"}])
    assert "deit (runs/a)" in table and "deit (runs/b)" in table and "other (runs/c)" not in table and "other" in table


def test_tensorboard_missing_is_said(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.warns(RecipeWarning, match="tensorboard is not installed"):
        log = MetricsLog(tmp_path, True, 0)
    assert log.writer is None


def test_one_step_cosine_is_quiet(caplog):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with caplog.at_level(logging.WARNING):
        build_scheduler(optimizer, OptimConfig(epochs=1, warmup_epochs=0), steps_per_epoch=1)
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]
    assert logging.getLogger("timm.scheduler.cosine_lr").level == logging.NOTSET  # the logger is restored


def test_epoch_line_says_the_accuracy_is_evaluation():
    line = epoch_line(ROW, 3)
    assert "eval top1 61.25" in line and "ema eval top1 55.50" in line


def test_timm_export_follows_the_umask(tmp_path):
    from conftest import TINY_DEIT, tiny_run

    from vitdistill import load_recipe, train
    from vitdistill.export import export_run

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(load_recipe("demo_student", tiny_run(out, *TINY_DEIT, "optim.epochs=1", "data.train_limit=64", "data.eval_limit=32")))
        folder = export_run(out)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


def test_a_recipe_can_replace_an_inherited_mapping(tmp_path):
    from vitdistill.config import read_recipe
    from vitdistill.validate import load_recipe

    (tmp_path / "tiny_vit.yaml").write_text(
        "base: demo_student\nmodel:\n  name: tiny_vit_5m_224\n  img_size: null\n  patch_size: null\n"
        "  kwargs: {_replace: true, embed_dims: [16, 32, 48, 64]}\n"
    )
    raw = read_recipe(str(tmp_path / "tiny_vit.yaml"))
    assert raw["model"]["kwargs"] == {"embed_dims": [16, 32, 48, 64]}  # not the DeiT base's embed_dim/depth/heads
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: demo_student\nmodel:\n  kwargs: {depth: 2}\n")
    assert read_recipe(str(merged))["model"]["kwargs"] == {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}  # default: merged
    assert load_recipe(str(tmp_path / "tiny_vit.yaml")).model.kwargs == {"embed_dims": [16, 32, 48, 64]}


def test_the_run_folder_keeps_a_log_of_what_was_printed(tmp_path, capsys):
    from conftest import TINY_DEIT, tiny_run

    from vitdistill.cli import main

    out = tmp_path / "run"
    assert main(["train", "demo_student", *tiny_run(out, *TINY_DEIT, "optim.epochs=1", "data.train_limit=64", "data.eval_limit=32")]) == 0
    printed = capsys.readouterr().out
    log = (out / "run.log").read_text()
    assert "epoch 1/1" in log and "eval top1" in log and "finished in" in log
    assert all(line in printed for line in log.splitlines() if line)  # the same lines as on the terminal
