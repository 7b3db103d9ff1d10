"""A small VGG-style CNN, registered in timm as ``vitdistill_convnet_{tiny,small}``.

timm has no CNN small enough to train in seconds on a CPU (its smallest ResNets keep 64-512
channels), which the offline demo and the tests need. Registering it in timm's registry lets it
be built by name like any other teacher.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models import register_model
from timm.models._features import feature_take_indices


def _stage(cin: int, cout: int, depth: int) -> nn.Sequential:
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """``[conv3x3-BN-ReLU] x depth`` per stage, 2x2 max-pool between stages, average pool, linear."""

    def __init__(self, num_classes: int = 1000, widths=(32, 64, 128), depth: int = 2, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        stages, cin = [], in_chans
        for i, width in enumerate(widths):
            if i:
                stages.append(nn.MaxPool2d(2))
            stages.append(_stage(cin, width, depth))
            cin = width
        self.features = nn.Sequential(*stages)
        self.num_features = cin
        # timm's feature API: one entry per stage (the output of its last conv-BN-ReLU)
        self.feature_info = [dict(num_chs=w, reduction=2**i, module=f"features.{2 * i}") for i, w in enumerate(widths)]
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``forward_intermediates``: the outputs of the stages in ``indices`` (an int: the
        last n; negative indices count from the end) and, unless ``intermediates_only``, the final
        features (what ``forward_head`` takes)."""
        if output_fmt != "NCHW":
            raise ValueError("ConvNet gives NCHW feature maps only")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        stage = 0
        for module in self.features:
            x = module(x)
            if not isinstance(module, nn.MaxPool2d):
                if stage in take:
                    intermediates.append(x)
                stage += 1
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


def _create(widths, depth, pretrained=False, **kwargs) -> ConvNet:
    if pretrained:
        raise ValueError("vitdistill convnets have no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return ConvNet(widths=widths, depth=depth, **kwargs)


@register_model
def vitdistill_convnet_tiny(pretrained=False, **kwargs) -> ConvNet:
    """~0.1M parameters: for tests and the offline demo."""
    return _create((16, 32, 64), 1, pretrained, **kwargs)


@register_model
def vitdistill_convnet_small(pretrained=False, **kwargs) -> ConvNet:
    """~0.3M parameters."""
    return _create((32, 64, 128), 2, pretrained, **kwargs)
