"""Small-image stems for CNN teachers: an ImageNet stem (stride 4 before the first stage)
turns a 32x32 image into 8x8 at once and wrecks accuracy. We replace it in place.

A model with the small stem is registered in timm as ``vitdistill_small_stem`` (its ``base``
argument names the timm CNN, ``resnet18`` by default): ``timm.create_model("vitdistill_small_stem",
base="resnet18", num_classes=10)`` after ``import vitdistill``. Its weights have the base model's
names (only the stem's shape differs), and it keeps timm's model contract (pretrained config,
``features_only``, ``forward_intermediates``), with feature strides divided by the stride removed.
"""

from __future__ import annotations

import math

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from ..errors import UserError

SMALL_STEM = "vitdistill_small_stem"


def use_small_input_stem(model: nn.Module, name: str) -> int:
    """Make the stem keep full resolution: stride-1 3x3 convolution and no max-pool. Returns the
    factor by which the stem's downsampling was reduced.

    Supported: timm ResNet-family (``conv1``/``maxpool``), RegNet (``stem.conv``) and ConvNeXt
    (patchify ``stem[0]``) models. Anything else is a clear error.
    """
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # resnet, resnext, seresnet, resnet*d ...
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        else:  # deep stem: a sequence of 3x3 convs, the first with stride 2
            first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return 4
    stem = getattr(model, "stem", None)
    if stem is not None and isinstance(getattr(stem, "conv", None), nn.Conv2d):  # regnet
        stem.conv.stride = (1, 1)
        return 2
    if isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d) and stem[0].stride[0] > 1:  # convnext
        conv = stem[0]
        stem[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1)
        return conv.stride[0]
    raise UserError(f"small_input_stem: not supported for {name} (supported: resnet, regnet and convnext families)")


def _small_stem_net(base: str = "resnet18", **kwargs) -> nn.Module:
    if not timm.is_model(base):
        raise UserError(f"small_input_stem: unknown timm model {base!r}")
    model = timm.create_model(base, pretrained=False, **kwargs)
    factor = use_small_input_stem(model, base)
    if isinstance(getattr(model, "feature_info", None), list):  # the strides timm's feature wrappers report
        model.feature_info = [{**info, "reduction": max(1, info["reduction"] // factor)} for info in model.feature_info]
    return model


# timm's pretrained-config keys, for the default base (resnet18) at 32x32; the entry point below
# takes first_conv/classifier from the base's own config and derives pool_size from its strides.
default_cfgs = generate_default_cfgs(
    {
        SMALL_STEM: {
            "url": "",  # no published weights: pretrained=True needs a file or a local-dir export
            "num_classes": 1000,
            "input_size": (3, 32, 32),
            "pool_size": (4, 4),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1",
            "classifier": "fc",
        }
    }
)


@register_model
def vitdistill_small_stem(pretrained: bool = False, base: str = "resnet18", **kwargs) -> nn.Module:
    """The timm CNN ``base`` with a stride-1 3x3 stem and no max-pool (for 32x32 images)."""
    base_cfg = get_pretrained_cfg(base)
    overlay = {k: getattr(base_cfg, k) for k in ("first_conv", "classifier")} if base_cfg is not None else {}
    overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    feature_cfg = {"feature_cls": "getter"}
    if kwargs.get("features_only") and "out_indices" not in kwargs:
        with torch.device("meta"):  # how many feature levels the base has, without allocating it
            feature_cfg["out_indices"] = len(timm.create_model(base, pretrained=False).feature_info)
    model = build_model_with_cfg(
        _small_stem_net, SMALL_STEM, pretrained, pretrained_cfg_overlay=overlay, feature_cfg=feature_cfg, base=base, **kwargs
    )
    info = getattr(model, "feature_info", None)
    reductions = info.reduction() if hasattr(info, "reduction") else [i["reduction"] for i in info or []]
    if reductions:
        height, width = model.pretrained_cfg["input_size"][1:]
        model.pretrained_cfg["pool_size"] = (math.ceil(height / reductions[-1]), math.ceil(width / reductions[-1]))
    return model
