"""timm's model contract, checked the way timm's generic model tests (its tests/test_models.py)
check each model, on what we register or export: LV-ViT (as registered, and as exported without
its training-only per-token head), a DeiT trained with our per-token head (as its timm export
describes it), the small-stem teacher, and our small CNN.

Per model: a complete pretrained config whose first_conv/classifier name real weights; forward,
and backward reaching every parameter; grad checkpointing leaves the output unchanged;
``features_only=True`` through timm's feature wrapper; ``forward_intermediates`` agreeing with
``forward_features`` and the feature metadata; torch.fx tracing (timm's leaf modules and
functions) giving the same output; TorchScript; ViTs: ``dynamic_img_size``.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._input import get_model_input_config
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from vitdistill.config import ModelConfig
from vitdistill.export import export_run
from vitdistill.models import build_model, export_model

# the keys timm's registry cfgs carry and its tests or data pipeline read
CFG_KEYS = {
    "url",
    "num_classes",
    "input_size",
    "pool_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "first_conv",
    "classifier",
    "architecture",
}
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _token_head_deit(tmp_path_factory) -> tuple[str, dict]:
    """A DeiT with our per-token head, exported for timm: the architecture and arguments timm reads."""
    folder = tmp_path_factory.mktemp("deit") / "run"
    folder.mkdir()
    model = build_model(
        ModelConfig(name="deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, kwargs=TINY_VIT, token_head=True), 10, input_size=16
    )
    export_model(model, folder / "model.safetensors")
    config = json.loads((export_run(folder) / "config.json").read_text())
    return config["architecture"], config["model_args"]


CASES = {
    "lvvit": ("lvvit_tiny", {"img_size": 16, "patch_size": 4, "num_classes": 10, **TINY_VIT}),
    "lvvit_export": ("lvvit_tiny", {"img_size": 16, "patch_size": 4, "num_classes": 10, "aux_head": False, **TINY_VIT}),
    "token_head_deit": None,  # built from its export, below
    "small_stem": ("vitdistill_small_stem", {"base": "resnet18", "num_classes": 10}),
    "convnet": ("vitdistill_convnet_tiny", {"num_classes": 10}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    if request.param == "token_head_deit":
        name, args = _token_head_deit(tmp_path_factory)
    else:
        name, args = CASES[request.param]
    return request.param, name, args


def create(name, args, **extra):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**args, **extra})


def size_of(model) -> tuple[int, int, int]:
    """The model's current input size (timm's traits; pretrained_cfg describes the source weights)."""
    return tuple(get_model_input_config(model)["input_size"])


def test_pretrained_cfg_is_complete(case):
    _, name, args = case
    model = create(name, args)
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert CFG_KEYS <= set(cfg), CFG_KEYS - set(cfg)
    assert timm.models.get_pretrained_cfg(name) is not None  # registered with the model
    assert model.num_classes == 10 and model.num_features > 0 and model.head_hidden_size > 0
    first = cfg["first_conv"] if isinstance(cfg["first_conv"], (list, tuple)) else [cfg["first_conv"]]
    classifier = cfg["classifier"] if isinstance(cfg["classifier"], (list, tuple)) else [cfg["classifier"]]
    assert all(f"{c}.weight" in state for c in first)
    assert all(f"{c}.weight" in state for c in classifier if getattr(model, c, None) is not None)
    if cfg["pool_size"] is not None:  # CNNs: the unpooled feature map at the config's input size
        x = torch.randn(1, *cfg["input_size"])
        assert tuple(model.eval().forward_features(x).shape[-2:]) == tuple(cfg["pool_size"])
        model.reset_classifier(0, "")
        assert model(x).dim() == 4


def test_forward_backward_and_grad_checkpointing(case):
    label, name, args = case
    model = create(name, args).train()
    x = torch.randn(2, *size_of(model))
    out = model(x)
    out.mean().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # LV-ViT as registered keeps the reference's per-token head, which forward does not use
    # (token labeling reads it directly); its export drops it and uses every parameter.
    assert unused == ({"aux_head.weight", "aux_head.bias"} if label == "lvvit" else set())
    model.eval()
    with torch.no_grad():
        reference = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)


def test_features_only_and_forward_intermediates(case):
    _, name, args = case
    model = create(name, args).eval()
    depth = len(model.feature_info)
    x = torch.randn(1, *size_of(model))
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        features = create(name, args, features_only=True, out_indices=tuple(range(depth))).eval()
        outputs = features(x)
    info = features.feature_info
    assert len(outputs) == len(info.channels()) == len(intermediates) == depth
    for channels, reduction, o, i in zip(info.channels(), info.reduction(), outputs, intermediates):
        assert o.shape[1] == channels == i.shape[1]
        assert o.shape[2] <= math.ceil(x.shape[2] / reduction) + 1 and o.shape[3] <= math.ceil(x.shape[3] / reduction) + 1
        torch.testing.assert_close(o, i)


def test_fx_trace_and_torchscript(case):
    _, name, args = case
    model = create(name, args).eval()
    x = torch.randn(1, *size_of(model))
    tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(), "param_shapes_constant": True}
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(next(iter(traced(x).values())), reference)
        with timm.layers.set_layer_config(scriptable=True):
            scriptable = create(name, args).eval()
        torch.testing.assert_close(torch.jit.script(scriptable)(x), reference)


def test_dynamic_img_size(case):
    label, name, args = case
    if "lvvit" not in label and "deit" not in label:
        pytest.skip("CNNs take any input size")
    fixed = create(name, args).eval()
    dynamic = create(name, args, dynamic_img_size=True).eval()
    assert get_model_input_config(fixed)["fixed_input_size"] and not get_model_input_config(dynamic)["fixed_input_size"]
    x = torch.randn(2, *size_of(fixed))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))  # same weights, native size: same logits
        wide = dynamic(torch.randn(2, 3, 24, 32))
        _, grids = dynamic.forward_intermediates(torch.randn(1, 3, 24, 32))
    assert wide.shape == (2, 10) and grids[-1].shape[-2:] == (6, 8)  # 4x4 patches
    with pytest.raises(AssertionError):
        fixed(torch.randn(1, 3, 24, 32))
