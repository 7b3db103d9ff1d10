"""vitdistill export: the timm hub folder (loaded by plain timm in a process that never imports
vitdistill), ONNX (ONNX Runtime against PyTorch), EMA weights, models that need ``import
vitdistill`` (small-stem teacher, LV-ViT), and the vitdistill way back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DEIT, tiny_run
from safetensors import safe_open

from vitdistill import load_recipe, train
from vitdistill.augment import Augmenter
from vitdistill.cli import main
from vitdistill.config import AugmentConfig, DataConfig, ModelConfig
from vitdistill.data import open_source
from vitdistill.errors import UserError
from vitdistill.export import OPSET, export_run, onnx_max_abs_diff
from vitdistill.models import build_model, export_model, load_model
from vitdistill.models.adapt import tiny_vit_windows

onnx = pytest.importorskip("onnx")  # in the test extra; a plain install need not have it

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A distilled DeiT with our per-token head and EMA weights, 2 epochs on digits."""
    out = tmp_path_factory.mktemp("export") / "run"
    train(load_recipe("demo_student", tiny_run(out, *TINY_DEIT, "model.token_head=true", "engine.ema_decay=0.9")))
    return out


def digits_views(model, count: int = 64) -> torch.Tensor:
    """Real evaluation inputs: the first ``count`` test digits as the run's evaluation view."""
    source = open_source(DataConfig(source="digits"), "test", count)
    views = Augmenter(source, AugmentConfig(input_size=model.spec.input_size), 0, model.spec.mean, model.spec.std, torch.device("cpu"))
    return views.eval_batch(torch.arange(count)).images


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (no vitdistill on its path unless the code imports it from src)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd="/")


PLAIN_TIMM = """
import sys, torch, timm
folder, inputs, reference = sys.argv[1:4]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
x, ref = torch.load(inputs), torch.load(reference)
with torch.no_grad():
    out = model(x)
    feats = timm.create_model("local-dir:" + folder, pretrained=True, features_only=True, out_indices=(0, 1)).eval()(x)
assert torch.equal(out, ref), (out - ref).abs().max()
assert "vitdistill" not in sys.modules
print(model.pretrained_cfg["label_names"], len(feats))
"""


def test_timm_export_loads_in_plain_timm_with_identical_logits(run, tmp_path):
    model = load_model(run)
    folder = export_run(run)
    assert folder == run / "export" / "timm" and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224" and config["num_classes"] == 10
    assert config["label_names"] == [str(d) for d in range(10)]
    assert config["model_args"] | {"img_size": [8, 8], "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2} == config["model_args"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 8, 8] and cfg["mean"] == list(MEAN) and cfg["std"] == list(STD) and cfg["crop_pct"] == 1.0
    assert "tag" not in cfg and "license" not in cfg  # the registry's published weights are not these
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.backbone.state_dict())  # the student alone: no _vitdistill.token_head.*
    assert any(k.startswith("head_dist.") for k in keys)  # timm's own distillation head stays
    x = torch.cat([torch.randn(3, 3, 8, 8), digits_views(model)])
    with torch.no_grad():
        torch.save(model(x).head("mean"), tmp_path / "ref.pt")
    torch.save(x, tmp_path / "x.pt")
    done = run_python(PLAIN_TIMM, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "ref.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("]")[0] == str([str(d) for d in range(10)]).rstrip("]")
    # vitdistill reads the same folder back (the spec travels in the weights' metadata)
    again = load_model(folder)
    assert not again.spec.token_head and again.token_head is None
    with torch.no_grad():
        assert torch.equal(again(x).head("mean"), model(x).head("mean"))


def test_ema_export_and_clear_errors(run, tmp_path, capsys):
    assert main(["export", str(run), "--ema", "--output", str(tmp_path / "ema")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    ema, plain = load_model(tmp_path / "ema"), load_model(run)
    emb = "pos_embed"
    assert torch.equal(ema.backbone.state_dict()[emb], load_model(run / "model_ema.safetensors").backbone.state_dict()[emb])
    assert not torch.equal(ema.backbone.state_dict()[emb], plain.backbone.state_dict()[emb])
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert main(["export", str(run / "model.safetensors"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "neither a run folder nor a .safetensors" in err and "--ema needs a run folder" in err and err.count("\n") == 2
    with pytest.raises(UserError, match="unknown format"):
        export_run(run, "tflite")


def test_onnx_matches_pytorch_on_random_and_real_images(run, capsys):
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert "ONNX Runtime vs PyTorch" in capsys.readouterr().out
    folder = run / "export" / "onnx"
    model = load_model(run)
    proto = onnx.load(str(folder / "model.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["label_names"]) == [str(d) for d in range(10)] and json.loads(meta["mean"]) == list(MEAN)
    assert "mean of the class and distillation heads" in meta["output"]
    assert onnx_max_abs_diff(folder, model, torch.randn(1, 3, 8, 8)) <= 1e-4  # dynamic batch: 1 ...
    assert onnx_max_abs_diff(folder, model, torch.randn(7, 3, 8, 8)) <= 1e-4  # ... and 7
    assert onnx_max_abs_diff(folder, model, digits_views(model)) <= 1e-4  # real digits, as evaluated


def _export_untrained(cfg: ModelConfig, folder: Path) -> tuple:
    torch.manual_seed(0)
    model = build_model(cfg, 10, classes=list("abcdefghij"), input_size=16, mean=MEAN, std=STD).eval()
    folder.mkdir(parents=True)
    export_model(model, folder / "model.safetensors")
    return model, export_run(folder)


WITH_VITDISTILL = """
import sys, torch, timm
sys.path.insert(0, sys.argv[4])
import vitdistill  # registers vitdistill_small_stem and lvvit_* in timm
folder, inputs, reference = sys.argv[1:4]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
with torch.no_grad():
    out = model(torch.load(inputs))
assert torch.equal(out, torch.load(reference)), (out - torch.load(reference)).abs().max()
print(type(model).__name__, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.parametrize(
    "cfg, architecture, kind, needs_vitdistill",
    [
        (ModelConfig(name="resnet18", small_input_stem=True), "vitdistill_small_stem", "ResNet", True),
        (
            ModelConfig(name="lvvit_tiny", img_size=16, patch_size=4, kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}),
            "lvvit_tiny",
            "LVViT",
            True,
        ),
        (ModelConfig(name="tiny_vit_5m_224", img_size=16), "tiny_vit_5m_224", "TinyVit", False),
    ],
)
def test_other_families_timm_and_onnx(cfg, architecture, kind, needs_vitdistill, tmp_path):
    """The small-stem teacher and LV-ViT load with timm once vitdistill is imported (plain timm
    says 'Unknown model'); LV-ViT's training-only aux_head stays behind; TinyViT's windows fitted
    to small inputs travel in model_args (plain timm). ONNX Runtime agrees with PyTorch on each."""
    model, folder = _export_untrained(cfg, tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == architecture
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("aux_head.", "_vitdistill.")) for k in f.keys())
    if kind == "LVViT":
        assert config["model_args"]["aux_head"] is False and config["pretrained_cfg"]["classifier"] == ["head"]
    elif kind == "ResNet":
        assert config["model_args"]["base"] == "resnet18"
    else:
        assert config["model_args"]["window_sizes"] == tiny_vit_windows(16) == [4, 2, 1, 1]  # fitted to 16x16
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.save(model(x).head("mean"), tmp_path / "ref.pt")
    torch.save(x, tmp_path / "x.pt")
    inputs = (str(folder), str(tmp_path / "x.pt"), str(tmp_path / "ref.pt"))
    plain = run_python(PLAIN_TIMM, *inputs)
    if needs_vitdistill:
        assert plain.returncode != 0 and f"Unknown model ({architecture})" in plain.stderr
        done = run_python(WITH_VITDISTILL, *inputs, str(ROOT / "src"))
        assert done.returncode == 0, done.stderr[-2000:]
        left_behind = model.backbone.aux_head.parameters() if kind == "LVViT" else []
        expected = sum(p.numel() for p in model.backbone.parameters()) - sum(p.numel() for p in left_behind)
        assert done.stdout.split() == [kind, str(expected)]
    else:
        assert plain.returncode == 0, plain.stderr[-2000:]
    onnx_folder = export_run(tmp_path / "run", "onnx")
    assert onnx_max_abs_diff(onnx_folder, model, x) <= 1e-4
