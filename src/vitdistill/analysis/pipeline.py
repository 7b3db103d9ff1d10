"""``analyze``: load one or two trained models, measure them on the same images, write
``analysis.json``, the figures and ``report.md``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..augment import Augmenter
from ..config import AugmentConfig
from ..config.parsing import parse_dataclass
from ..data import ImageSource, open_source
from ..data.source import balanced_order
from ..device import resolve_device
from ..errors import UserError
from ..models import VisionModel
from ..run_folder import data_config_for, load_trained
from .landscape import Batches, axis, loss_landscape_1d, loss_landscape_2d
from .plots import plot_all
from .report import write_report
from .stats import model_statistics


def _label(path: str | Path) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.parent.name or path.stem


def _subset(source: ImageSource, n: int) -> torch.Tensor:
    """Sorted indices of a class-balanced slice of ``n`` images (all when fewer)."""
    return torch.tensor(sorted(balanced_order(source.labels.tolist())[:n]), dtype=torch.long)


def _batches(views: Augmenter, index: torch.Tensor, batch_size: int) -> Batches:
    out = []
    for chunk in index.split(batch_size):
        view = views.eval_batch(chunk)
        out.append((view.images, view.labels))
    return out


def _views(model: VisionModel, recipe: dict | None, source: ImageSource, data_mean, data_std, device: torch.device) -> Augmenter:
    aug = parse_dataclass(AugmentConfig, (recipe or {}).get("augment") or {}, "augment")
    spec = model.spec
    aug.input_size = spec.input_size or aug.input_size
    return Augmenter(source, aug, 0, spec.mean or data_mean, spec.std or data_std, device)


def analyse_one(
    model: VisionModel,
    views: Augmenter,
    index: torch.Tensor,
    landscape_index: torch.Tensor,
    landscape_steps: int,
    landscape_grid: int,
    landscape_span: float,
    seed: int,
    batch_size: int,
) -> tuple[dict, torch.Tensor | None]:
    """Statistics and landscape of one model (on ``views.device``); the JSON dict and its mean
    attention maps."""
    batches = _batches(views, index, batch_size)
    result, maps = model_statistics(model, batches)
    landscape = None
    if len(landscape_index):
        land = batches if torch.equal(landscape_index, index) else _batches(views, landscape_index, batch_size)
        landscape = {"span": landscape_span, "seed": seed, "images": len(landscape_index)}
        landscape["1d"] = loss_landscape_1d(model, land, axis(landscape_span, landscape_steps), seed=seed)
        if landscape_grid:
            grid = axis(landscape_span, landscape_grid)
            landscape["2d"] = loss_landscape_2d(model, land, grid, grid, seed=seed)
    result["landscape"] = landscape
    return result, maps


def analyze(
    checkpoint: str | Path,
    output: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: Sequence[str] = (),
    compare: str | Path | None = None,
    images: int = 256,
    landscape_images: int = 256,
    landscape_steps: int = 21,
    landscape_grid: int = 11,
    landscape_span: float = 1.0,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Analyse a trained model (and optionally ``compare``, a second one, on the same images).

    ``checkpoint``/``compare``: run folder, ``model.safetensors`` or ``checkpoint.pt``. The images
    are a class-balanced slice of ``images`` images of ``split`` (default: the run's evaluation
    split; ``data``/``overrides`` as in ``vitdistill eval``; ``images`` replaces
    ``data.eval_limit``). Per block: patch-token cosine similarity, attention std, attention
    distance per head, head similarity, mean attention map, class/distillation token cosine; the
    loss landscape along filter-normalised random directions (1-D with ``landscape_steps`` points,
    2-D on a ``landscape_grid`` square grid, 0 to skip; over ``[-span, span]``) on
    ``landscape_images`` of the images (0 to skip). Writes ``analysis.json``, PNG figures and
    ``report.md`` into ``output`` and returns the ``analysis.json`` dict.
    """
    if images < 1 or landscape_images < 0 or batch_size < 1:
        raise UserError("analysis: images and batch size must be positive (landscape images >= 0)")
    if landscape_grid < 0 or landscape_grid == 1:
        raise UserError(f"analysis: the landscape grid needs 0 (off) or at least 2 points per axis, got {landscape_grid}")
    if landscape_images:
        axis(landscape_span, landscape_steps)  # validate before any work
    paths = [Path(checkpoint)] + ([Path(compare)] if compare is not None else [])
    loaded = [load_trained(p) for p in paths]
    data_cfg = data_config_for(loaded[0][1], data, list(overrides))
    source = open_source(data_cfg, split or data_cfg.eval_split, max(images, landscape_images))
    for path, (model, _) in zip(paths, loaded):
        if model.spec.num_classes != source.num_classes:
            raise UserError(f"analysis: {path} predicts {model.spec.num_classes} classes but {source.name} has {source.num_classes}")
    dev = resolve_device(device)
    index, landscape_index = _subset(source, images), _subset(source, landscape_images)
    labels = [_label(p) for p in paths]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (A)", f"{labels[1]} (B)"]
    runs: dict[str, dict] = {}
    maps: dict[str, torch.Tensor | None] = {}
    for label, path, (model, recipe) in zip(labels, paths, loaded):
        model = model.to(dev).eval()
        views = _views(model, recipe, source, data_cfg.mean, data_cfg.std, dev)
        stats, maps[label] = analyse_one(
            model, views, index, landscape_index, landscape_steps, landscape_grid, landscape_span, seed, batch_size
        )
        runs[label] = {
            "label": label,
            "checkpoint": str(path),
            "model": model.spec.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            **stats,
        }
        model.cpu()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figures = plot_all(runs, maps, output)
    analysis = {
        "checkpoint": str(paths[0]),
        "compare": str(paths[1]) if compare is not None else None,
        "data": source.name,
        "split": split or data_cfg.eval_split,
        "images": len(index),
        "landscape_images": len(landscape_index) if landscape_images else 0,
        "seed": seed,
        "models": list(runs.values()),
        "figures": figures,
        "report": "report.md",
    }
    write_report(analysis, output)
    (output / "analysis.json").write_text(json.dumps(analysis, indent=2, allow_nan=False))
    return analysis
