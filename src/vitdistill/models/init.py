"""The Feature-Distillation reference's student initialisation, for timm ViTs.

Its student (``models/feature_distillation.py``, ``VisionTransformerForFD``) draws every linear
and convolution weight, the class token and the absolute position embedding from N(0, 0.02²)
truncated at ±1 std (``trunc_normal_(t, std=.02, a=-.02, b=.02)``: an actual std of about 0.0108),
biases zero, then divides each block's attention output and second MLP weights by
sqrt(2 · (block + 1)) (BEiT's rescaling). timm draws the same N(0, 0.02²) truncated at ±2 in
absolute terms (±100 std: practically untruncated, std 0.02).
"""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02


@torch.no_grad()
def truncated_init(backbone: nn.Module, bound: float, std: float = INIT_STD) -> None:
    """Re-draw ``backbone``'s weights as the reference does, truncated at ±``bound`` std. The
    classifier keeps timm's initialisation (the reference's student has none while it is
    distilled; BEiT scales a fresh head by ``head_init_scale``)."""

    def draw(tensor: torch.Tensor) -> None:
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-bound * std, b=bound * std)

    head = getattr(backbone, "head", None)
    skip = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    for module in backbone.modules():
        if id(module) in skip or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        draw(module.weight)
        if module.bias is not None:
            module.bias.zero_()
    for name in ("pos_embed", "cls_token"):
        param = getattr(backbone, name, None)
        if isinstance(param, torch.Tensor):
            draw(param)
    rescale = getattr(backbone, "fix_init_weight", None)
    if callable(rescale):  # BEiT: proj and fc2 of block i divided by sqrt(2 (i + 1)), as timm did at build
        rescale()
