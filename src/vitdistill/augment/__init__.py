"""Seeded, batched augmentation: the same (seed, epoch, index) always gives the same view."""

from .pipeline import Augmenter, ViewBatch

__all__ = ["Augmenter", "ViewBatch"]
