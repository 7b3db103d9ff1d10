"""TinyViT students at small inputs, and finetuning: layer-wise lr decay, frozen BatchNorm."""

from __future__ import annotations

import torch
from conftest import tiny_run
from safetensors.torch import load_file

from vitdistill import load_recipe, train
from vitdistill.config import ModelConfig
from vitdistill.device import DistEnv
from vitdistill.models import build_model, export_model
from vitdistill.models.adapt import tiny_vit_windows
from vitdistill.runner import build_trainer

TINY_VIT = ["model.name=tiny_vit_5m_224", "model.img_size=8", "model.patch_size=null", "model.kwargs={}"]


def test_tiny_vit_windows_fit_small_inputs():
    assert tiny_vit_windows(224) == [7, 7, 14, 7]  # timm's defaults at 224
    assert tiny_vit_windows(32) == [7, 4, 2, 1]  # stage resolutions 8, 4, 2, 1
    model = build_model(ModelConfig(name="tiny_vit_11m_224", img_size=32), 10).eval()
    blocks = [blk for stage in model.backbone.stages[1:] for blk in stage.blocks]
    assert [b.window_size for b in blocks[:1]] == [4] and blocks[-1].window_size == 1
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)


def test_finetune_with_layer_decay_and_frozen_batchnorm(tmp_path):
    pretrained = train(load_recipe("demo_student", tiny_run(tmp_path / "pre", *TINY_VIT, "optim.epochs=1")))
    init = pretrained.output / "model.safetensors"
    cfg = load_recipe(
        "demo_student", tiny_run(tmp_path / "ft", *TINY_VIT, f"model.init={init}", "model.freeze_bn=true", "optim.layer_decay=0.8")
    )
    trainer = build_trainer(cfg, DistEnv(0, 1, torch.device("cpu")), tmp_path / "ft")
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert scales[-1] == 1.0 and abs(scales[-2] - 0.8) < 1e-9 and scales[0] < 0.8**3  # head 1, then 0.8 per layer down to the stem
    bn_params = {id(p) for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params and not bn_params & {id(p) for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad}
    result = train(cfg)
    before, after = load_file(str(init)), load_file(str(result.output / "model.safetensors"))
    bn_keys = [k for k in before if "bn." in k or k.endswith(("running_mean", "running_var"))]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)  # statistics and affine fixed
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in bn_keys)  # the rest learned


def test_init_from_a_model_with_another_class_count_resets_only_the_classifier(tmp_path, capsys):
    seven = build_model(ModelConfig(name="vitdistill_convnet_tiny"), 7)
    export_model(seven, tmp_path / "seven.safetensors")
    ten = build_model(ModelConfig(name="vitdistill_convnet_tiny", init=str(tmp_path / "seven.safetensors")), 10)
    assert "classifier" in capsys.readouterr().out
    a, b = seven.backbone.state_dict(), ten.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert b["head.weight"].shape == (10, 64)
