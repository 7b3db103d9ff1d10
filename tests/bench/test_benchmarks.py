"""The benchmark scripts run (tiny settings, CPU) and report every variant."""

from __future__ import annotations

import json
import py_compile

from conftest import ROOT

from vitdistill.cli import main


def test_benchmark_scripts_compile():
    for script in (ROOT / "benchmarks").glob("*.py"):
        py_compile.compile(str(script), doraise=True)


def test_mean_std_over_seeds():
    from vitdistill.bench.seeds import mean_std

    assert mean_std([1.0, 2.0, 4.0]) == "2.33 ± 1.53"  # the sample std (n - 1)
    assert mean_std([0.25], digits=3) == "0.250 ± 0.000"  # one seed: no spread


def test_throughput_benchmark_reports_all_variants(tmp_path, capsys, monkeypatch):
    out = tmp_path / "throughput.json"
    args = [
        "bench",
        "throughput",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--workers",
        "1",
        "--synthetic-images",
        "16",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(out),
    ]
    assert main([*args, "--regimes", "cifar32", "--teacher", "regnety_002"]) == 0
    report = json.loads(out.read_text())
    result = report["results"][0]
    for key in (
        "a_bare_img_s",
        "b_pipeline_img_s",
        "c_pipeline_teacher_img_s",
        "d_loader_img_s",
        "d_loader_teacher_img_s",
        "e_pipeline_store_img_s",
    ):
        assert result[key] > 0, key
    assert result["c_over_a"] == result["c_pipeline_teacher_img_s"] / result["a_bare_img_s"]
    assert report["machine"]["torch"]
    assert "(c)/(a)" in capsys.readouterr().out
    # the 224 regime with small stand-ins: synthetic full-size JPEGs decoded once to 256 px; a variant
    # that fails keeps its first line in the table and its whole message and traceback in the JSON
    from vitdistill.bench import throughput

    def broken(*_):
        raise RuntimeError("compile worker failed\nthe worker's own traceback, line 2")

    monkeypatch.setattr(throughput, "measure_bare", broken)
    assert main([*args, "--regimes", "imagenet224", "--teacher", "vitdistill_convnet_tiny", "--student", "deit_tiny_patch16_224"]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["input_size"] == 224 and result["a_bare_img_s"] is None and result["b_pipeline_img_s"] > 0
    assert result["errors"]["a_bare_img_s"] == "RuntimeError: compile worker failed"
    assert "line 2" in result["tracebacks"]["a_bare_img_s"] and "in broken" in result["tracebacks"]["a_bare_img_s"]


def test_compare_seeds_script(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    shrink = ["optim.epochs=1", "data.train_limit=128", "data.eval_limit=64", "optim.batch_size=32", f"data.cache_dir={tmp_path}"]
    argv = [
        "compare_seeds.py",
        "--data",
        "unused",
        "--seeds",
        "0",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--analyze",
        "--analysis-images",
        "32",
        "--json",
        str(tmp_path / "c.json"),
        "--variant",
        "plain",
        "demo_student",
        *shrink,
        "--variant",
        "diverse",
        "demo_student",
        *shrink,
        "model.token_head=true",
        "objective=[{term: ce}, {term: patch_cosine, weight: 0.5}]",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "benchmarks" / "compare_seeds.py"), run_name="__main__")
    results = json.loads((tmp_path / "c.json").read_text())
    assert set(results) == {"plain", "diverse"} and len(results["plain"]["runs"]) == 2
    assert all(0 <= r["last_patch_cosine"] <= 1 for r in results["diverse"]["runs"])
    assert (tmp_path / "runs" / "analysis-compare" / "report.md").is_file()
    assert "last-layer patch cos" in capsys.readouterr().out


def test_feature_distillation_digits_script(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    from conftest import CACHE

    shrink = ["optim.epochs=1", "data.train_limit=128", "data.eval_limit=64", "optim.batch_size=32", f"data.cache_dir={CACHE}"]
    argv = [
        "fd_seeds.py",
        "--seeds",
        "0",
        "1",
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--output",
        str(tmp_path / "runs"),
        "--analysis-images",
        "16",
        "--json",
        str(tmp_path / "fd.json"),
        *shrink,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "benchmarks" / "fd_seeds.py"), run_name="__main__")
    runs = json.loads((tmp_path / "fd.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(0 <= r["fd"] <= 100 and 0 <= r["baseline"] <= 100 for r in runs)
    summary = json.loads((tmp_path / "runs" / "baseline-s0" / "summary.json").read_text())
    assert summary["epochs"] == 2  # the baseline trains as many epochs as both stages together
    assert (tmp_path / "runs" / "analysis" / "attention_distance.png").is_file()
    assert "baseline: random init, 2 epochs" in capsys.readouterr().out
