"""The benchmark scripts run (tiny settings, CPU) and report every variant."""

from __future__ import annotations

import json
import py_compile

from vitdistill.cli import main

from conftest import ROOT


def test_benchmark_scripts_compile():
    for script in (ROOT / "benchmarks").glob("*.py"):
        py_compile.compile(str(script), doraise=True)


def test_throughput_benchmark_reports_all_variants(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    args = ["bench", "throughput", "--device", "cpu", "--batch-size", "4", "--warmup", "1", "--steps", "2", "--workers", "1",
            "--synthetic-images", "16", "--cache", str(tmp_path / "cache"), "--json", str(out)]
    assert main([*args, "--regimes", "cifar32", "--teacher", "regnety_002"]) == 0
    report = json.loads(out.read_text())
    result = report["results"][0]
    for key in ("a_bare_img_s", "b_pipeline_img_s", "c_pipeline_teacher_img_s", "d_loader_img_s", "d_loader_teacher_img_s", "e_pipeline_store_img_s"):
        assert result[key] > 0, key
    assert result["c_over_a"] == result["c_pipeline_teacher_img_s"] / result["a_bare_img_s"]
    assert report["machine"]["torch"]
    assert "(c)/(a)" in capsys.readouterr().out
    # the 224 regime with small stand-ins: synthetic full-size JPEGs decoded once to 256 px
    assert main([*args, "--regimes", "imagenet224", "--teacher", "vitdistill_convnet_tiny", "--student", "deit_tiny_patch16_224"]) == 0
    assert json.loads(out.read_text())["results"][0]["input_size"] == 224
