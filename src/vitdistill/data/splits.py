"""Open a split of the configured dataset (``data.source``): the one place that knows every
source. It sits above the sources (:mod:`.imagefolder`, :mod:`.hf`, :mod:`.builtin`), which
share only :mod:`.source` and :mod:`.decoded`; each is imported when a recipe asks for it, so an
optional one (``hf``) is never loaded for nothing."""

from __future__ import annotations

from ..config import DataConfig
from ..errors import UserError
from .source import ImageSource


def open_source(cfg: DataConfig, split: str, limit: int | None = None) -> ImageSource:
    """Open one split of the configured dataset, decoding (once, cached) as needed."""
    if cfg.source == "imagefolder":
        from .imagefolder import open_imagefolder

        return open_imagefolder(cfg, split, limit)
    if cfg.source == "hf":
        from .hf import open_hf

        return open_hf(cfg, split, limit)
    if cfg.source == "digits":
        from .builtin import open_digits

        return open_digits(split, limit)
    if cfg.source in ("cifar10", "cifar100"):
        from .builtin import open_torchvision_cifar

        return open_torchvision_cifar(cfg, split, limit)
    raise UserError(f"data.source: unknown source {cfg.source!r}")  # pragma: no cover - schema guards


def peek_classes(cfg: DataConfig) -> list[str] | None:
    """The training split's class names when they are known without reading any image (an
    ImageFolder's folder names, the digits), else None: what a run checks its model and teacher
    against before the data is decoded."""
    if cfg.source == "imagefolder":
        from .imagefolder import peek_imagefolder_classes

        return peek_imagefolder_classes(cfg, cfg.train_split)
    if cfg.source == "digits":
        return [str(d) for d in range(10)]
    return None


def open_splits(cfg: DataConfig) -> tuple[ImageSource, ImageSource]:
    """The training and evaluation splits; their class lists must agree."""
    train = open_source(cfg, cfg.train_split, cfg.train_limit)
    evaluation = open_source(cfg, cfg.eval_split, cfg.eval_limit)
    if train.classes != evaluation.classes:
        raise UserError(
            f"data: the {cfg.train_split} and {cfg.eval_split} splits have different classes "
            f"({len(train.classes)} vs {len(evaluation.classes)})"
        )
    return train, evaluation
