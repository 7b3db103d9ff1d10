"""A small VGG-style CNN, registered in timm as ``vitdistill_convnet_{tiny,small}``.

timm has no CNN small enough to train in seconds on a CPU (its smallest ResNets keep 64-512
channels), which the offline demo and the tests need. Registering it in timm's registry lets it
be built by name like any other teacher. It follows timm's model contract: a complete
``pretrained_cfg`` (no published weights), ``global_pool`` / ``reset_classifier``,
``forward_intermediates`` (one feature map per stage), ``features_only=True`` (timm's
``FeatureGetterNet``), ``set_grad_checkpointing``; it traces with torch.fx and scripts.
"""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn


def _stage(cin: int, cout: int, depth: int) -> nn.Sequential:
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """``[conv3x3-BN-ReLU] x depth`` per stage, 2x2 max-pool between stages, global pool, linear.

    ``features`` holds the stages at even positions and the pools between them (state-dict names
    ``features.<i>.*`` and ``head.*``)."""

    def __init__(
        self,
        num_classes: int = 1000,
        widths=(32, 64, 128),
        depth: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        stages, cin = [], in_chans
        self.feature_info = []
        for i, width in enumerate(widths):
            if i:
                stages.append(nn.MaxPool2d(2))
            stages.append(_stage(cin, width, depth))
            self.feature_info.append({"num_chs": width, "reduction": 2**i, "module": f"features.{len(stages) - 1}"})
            cin = width
        self.features = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cin
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _stage_positions(self) -> list[int]:
        return [int(info["module"].split(".")[1]) for info in self.feature_info]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices=None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """As timm's CNNs: the output of stages ``indices`` (int: the last n; None: all) as NCHW
        maps, with the final feature map unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        ends = self._stage_positions()
        last = ends[max_index] if stop_early else len(self.features) - 1
        intermediates = []
        for pos, layer in enumerate(self.features[: last + 1]):
            x = layer(x)
            if pos in ends and ends.index(pos) in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Keep the layers up to the last stage in ``indices`` (timm's feature wrappers call this)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.features = self.features[: self._stage_positions()[max_index] + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _cfg(**kwargs) -> dict:
    """timm's pretrained-config keys. No weights are published (``url`` empty): ``pretrained=True``
    needs ``pretrained_cfg_overlay=dict(file=...)`` or a local-dir export. Made for 32x32 inputs
    (8x8 digits in the demo); any size works."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),  # two 2x2 max-pools
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0.0",
        "classifier": "head",
        **kwargs,
    }


# Read by timm's register_model (below) from this module: the models' pretrained_cfg.
default_cfgs = generate_default_cfgs({"vitdistill_convnet_tiny": _cfg(), "vitdistill_convnet_small": _cfg()})


def _create(variant: str, widths, depth, pretrained=False, **kwargs) -> ConvNet:
    return build_model_with_cfg(
        ConvNet,
        variant,
        pretrained,
        feature_cfg={"feature_cls": "getter", "out_indices": len(widths)},
        widths=widths,
        depth=depth,
        **kwargs,
    )


@register_model
def vitdistill_convnet_tiny(pretrained=False, **kwargs) -> ConvNet:
    """~0.1M parameters: for tests and the offline demo."""
    return _create("vitdistill_convnet_tiny", (16, 32, 64), 1, pretrained, **kwargs)


@register_model
def vitdistill_convnet_small(pretrained=False, **kwargs) -> ConvNet:
    """~0.3M parameters."""
    return _create("vitdistill_convnet_small", (32, 64, 128), 2, pretrained, **kwargs)
