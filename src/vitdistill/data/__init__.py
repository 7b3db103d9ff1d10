"""Data sources: decoded uint8 images with labels and stable indices, and per-epoch batching."""

from .batches import epoch_order, eval_batches, steps_per_epoch, train_batches
from .source import ImageSource
from .splits import open_source, open_splits, peek_classes

__all__ = ["ImageSource", "epoch_order", "eval_batches", "open_source", "open_splits", "peek_classes", "steps_per_epoch", "train_batches"]
