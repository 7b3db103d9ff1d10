"""Small-image stems for CNN teachers: an ImageNet stem (stride 4 before the first stage)
turns a 32x32 image into 8x8 at once and wrecks accuracy. We replace it in place."""

from __future__ import annotations

from torch import nn

from ..errors import UserError


def use_small_input_stem(model: nn.Module, name: str) -> nn.Module:
    """Make the stem keep full resolution: stride-1 3x3 convolution and no max-pool.

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
        return model
    stem = getattr(model, "stem", None)
    if stem is not None and isinstance(getattr(stem, "conv", None), nn.Conv2d):  # regnet
        stem.conv.stride = (1, 1)
        return model
    if isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d) and stem[0].stride[0] > 1:  # convnext
        conv = stem[0]
        stem[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1)
        return model
    raise UserError(f"small_input_stem: not supported for {name} (supported: resnet, regnet and convnext families)")
