"""Fixes applied to timm for the benchmarks' conventional data path (never to training)."""

from __future__ import annotations


def black_on_zero_bits_posterize():
    """timm's ``posterize`` op, keeping 0 bits as a black image.

    timm's ``rand-m9-mstd0.5-inc1`` reaches ``PosterizeIncreasing`` at magnitude 10 (the std
    lets it clip there), i.e. 0 bits kept; Pillow >= 10 raises "bits must be between or equal to
    1 and 8" for that, crashing the DataLoader. Older Pillow gave a black image, as our batched
    RandAugment does. Used by the throughput benchmark's timm path only.
    """
    from PIL import Image
    from timm.data import auto_augment

    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    return posterize


def patch_timm_posterize() -> None:
    """Route timm's Posterize ops through :func:`black_on_zero_bits_posterize` (its op table
    holds the function itself, so the table entries are replaced; forked DataLoader workers
    inherit them)."""
    from timm.data import auto_augment

    if getattr(auto_augment.NAME_TO_OP.get("PosterizeIncreasing"), "_vitdistill_patched", False):
        return
    patched = black_on_zero_bits_posterize()
    patched._vitdistill_patched = True
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = patched
