"""Architecture arguments that timm does not derive from the input size by itself."""

from __future__ import annotations

import math

TINY_VIT_WINDOWS = (7, 7, 14, 7)  # timm's TinyViT defaults, made for 224x224 inputs


def tiny_vit_windows(img_size: int, windows=TINY_VIT_WINDOWS) -> list[int]:
    """TinyViT window sizes capped at each stage's resolution.

    The stem divides the input by 4 and each later stage by 2 (rounding up). With the 224x224
    defaults a 32x32 input would pad its 2x2 third stage to a 14x14 window (49x the tokens);
    capping keeps windows at most the stage's size (224 keeps 7, 7, 14, 7).
    """
    resolution = math.ceil(img_size / 4)
    sizes = []
    for stage, window in enumerate(windows):
        if stage:
            resolution = math.ceil(resolution / 2)
        sizes.append(max(1, min(window, resolution)))
    return sizes


def adapt_kwargs(name: str, kwargs: dict) -> dict:
    """timm arguments for ``name`` at the requested input size.

    TinyViT takes no ``img_size``; we turn it into window sizes that fit the input.
    """
    kwargs = dict(kwargs)
    if name.startswith("tiny_vit_") and "img_size" in kwargs:
        img_size = kwargs.pop("img_size")
        kwargs.pop("patch_size", None)
        kwargs.setdefault("window_sizes", tiny_vit_windows(img_size))
    return kwargs
