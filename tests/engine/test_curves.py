"""curves.png at the end of a run, and vitdistill compare: what is drawn is metrics.csv."""

from __future__ import annotations

import csv
import json

from conftest import tiny_run

from vitdistill import load_recipe, train
from vitdistill.analysis import curves
from vitdistill.cli import main
from vitdistill.engine import curves as run_curves
from vitdistill.models import load_model


def _csv_column(run, name):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    points = [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in ("", None)]
    return [e for e, _ in points], [v for _, v in points]


def _run(path, *extra):
    return train(load_recipe("demo_teacher", tiny_run(path, "model.name=vitdistill_convnet_tiny", "optim.epochs=3", *extra)))


def test_run_curves_are_the_metrics_columns(tmp_path):
    result = _run(tmp_path / "run", "engine.ema_decay=0.9", "engine.eval_every=2")
    run = result.output
    png = run / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = curves.run_series(curves.read_metrics(run))
    assert set(series) == {"loss", "lr", "top1"}
    assert {"train_loss", "train_ce", "eval_loss"} <= set(series["loss"]) and "train_img_per_s" not in series["loss"]
    assert set(series["top1"]) == {"eval_top1", "ema_top1"}  # one head: no per-head columns
    for _panel, columns in series.items():
        for name, (epochs, values) in columns.items():
            assert (epochs, values) == _csv_column(run, name)
    assert series["top1"]["eval_top1"][0] == [2, 3]  # evaluated every 2 epochs and at the end
    # the in-memory history draws the same series as the file
    assert curves.run_series(result.history)["lr"] == series["lr"]


def test_a_failing_plot_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(run_curves, "plot_run_curves", broken)
    result = _run(tmp_path / "run", "optim.epochs=1")
    assert (result.output / "model.safetensors").is_file() and not (result.output / "curves.png").exists()
    assert "could not draw" in capsys.readouterr().out


def test_compare_table_json_and_plot(tmp_path, capsys):
    a = _run(tmp_path / "a").output
    b = _run(tmp_path / "b", "optim.lr=1e-2", "engine.ema_decay=0.9").output
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png"), "--json", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "top-1 best (epoch)" in printed and "img/s" in printed
    rows = json.loads((tmp_path / "cmp.json").read_text())["runs"]
    assert [r["run"] for r in rows] == [str(a), str(b)]
    for row, run in zip(rows, (a, b)):
        epochs, top1 = _csv_column(run, "eval_top1")
        summary = json.loads((run / "summary.json").read_text())
        assert row["final_top1"] == top1[-1] and row["best_top1"] == max(top1) and row["best_epoch"] == epochs[top1.index(max(top1))]
        assert row["parameters"] == sum(p.numel() for p in load_model(run).parameters())
        assert row["wall_time_s"] == summary["wall_time_s"] and row["train_img_per_s"] == summary["train_img_per_s"]
        assert row["model"] == "vitdistill_convnet_tiny" and row["epochs"] == 3
    assert rows[0]["final_ema_top1"] is None and rows[1]["final_ema_top1"] == _csv_column(b, "ema_top1")[1][-1]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "metrics.csv does not exist" in capsys.readouterr().err
