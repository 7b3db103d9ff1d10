"""PNG figures of an analysis, for one model or two on the same axes (compare mode).

Every function takes ``runs``: an ordered mapping ``label -> model result`` (the per-model dicts
of ``analysis.json``) and the path to write; it returns the path, or None when no model has the
numbers the figure needs (e.g. attention of a CNN). matplotlib is imported lazily, with the
non-interactive Agg backend (:mod:`vitdistill.figures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..figures import integer_x, pyplot, save

COLOURS = ("tab:blue", "tab:orange")


def _layered(runs: Mapping[str, dict], key: str) -> dict[str, list]:
    return {label: r["layers"][key] for label, r in runs.items() if r.get("layers") and r["layers"].get(key) is not None}


def plot_layer_curve(
    runs: Mapping[str, dict], key: str, ylabel: str, title: str, path: Path, embedding_key: str | None = None
) -> Path | None:
    """One line per model: ``layers[key]`` against the block index (1..depth); with
    ``embedding_key`` the value of block 0's input is drawn at x = 0."""
    series = _layered(runs, key)
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for colour, (label, values) in zip(COLOURS, series.items()):
        xs, ys = list(range(1, len(values) + 1)), [float("nan") if v is None else v for v in values]
        if embedding_key and runs[label].get(embedding_key) is not None:
            xs, ys = [0, *xs], [runs[label][embedding_key], *ys]
        ax.plot(xs, ys, marker="o", color=colour, label=label)
    ax.set_xlabel("block (0 = patch embedding)" if embedding_key else "block")
    integer_x(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_attention_distance(runs: Mapping[str, dict], path: Path) -> Path | None:
    """Mean attention distance (pixels): one dot per head per block, the head mean as a line."""
    series = _layered(runs, "attention_distance")
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    offsets = [0.0] if len(series) == 1 else [-0.12, 0.12]
    for colour, offset, (label, rows) in zip(COLOURS, offsets, series.items()):
        for layer, heads in enumerate(rows, start=1):
            ax.scatter([layer + offset] * len(heads), heads, color=colour, s=18, alpha=0.7, label=label if layer == 1 else None)
        ax.plot(range(1, len(rows) + 1), runs[label]["layers"]["attention_distance_mean"], color=colour, alpha=0.6)
    ax.set_xlabel("block")
    integer_x(ax)
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title("Attention distance per head")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_attention_maps(maps: Mapping[str, torch.Tensor], path: Path) -> Path | None:
    """A grid of mean attention maps ``[T, T]`` (query rows, key columns): one row per model,
    one panel per block."""
    maps = {label: m for label, m in maps.items() if m is not None}
    if not maps:
        return None
    plt = pyplot()
    cols = max(m.shape[0] for m in maps.values())
    fig, axes = plt.subplots(len(maps), cols, figsize=(1.9 * cols + 0.6, 2.1 * len(maps)), squeeze=False)
    for row, (label, stack) in enumerate(maps.items()):
        for layer in range(cols):
            ax = axes[row][layer]
            ax.set_xticks([])
            ax.set_yticks([])
            if layer >= stack.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(stack[layer].cpu().numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"block {layer + 1}", fontsize=8)
        axes[row][0].set_ylabel(label, fontsize=8)
    fig.suptitle("Mean attention (query x key, over images and heads)", fontsize=10)
    return save(fig, path)


def _landscapes(runs: Mapping[str, dict], kind: str) -> dict[str, dict]:
    return {label: r["landscape"][kind] for label, r in runs.items() if r.get("landscape") and r["landscape"].get(kind)}


def plot_landscape_1d(runs: Mapping[str, dict], path: Path) -> Path | None:
    """Loss (left) and top-1 (right) along one filter-normalised direction."""
    series = _landscapes(runs, "1d")
    if not series:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for colour, (label, curve) in zip(COLOURS, series.items()):
        left.plot(curve["alpha"], curve["loss"], color=colour, label=label)
        right.plot(curve["alpha"], curve["top1"], color=colour, label=label)
    left.set_ylabel("cross-entropy")
    right.set_ylabel("top-1 (%)")
    for ax in (left, right):
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("1-D loss landscape", fontsize=10)
    return save(fig, path)


def plot_landscape_2d(runs: Mapping[str, dict], path: Path) -> Path | None:
    """Contours of the loss on the plane of two filter-normalised directions, one panel per model
    (shared levels when comparing)."""
    series = _landscapes(runs, "2d")
    if not series:
        return None
    plt = pyplot()
    import numpy as np

    grids = {label: np.asarray(s["loss"], dtype=float) for label, s in series.items()}
    low = min(float(np.nanmin(g)) for g in grids.values())
    high = max(float(np.nanmax(g)) for g in grids.values())
    levels = np.linspace(low, high if high > low else low + 1e-6, 16)
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 4), squeeze=False)
    for ax, (label, surface) in zip(axes[0], series.items()):
        beta, alpha = np.meshgrid(surface["beta"], surface["alpha"])
        filled = ax.contourf(alpha, beta, grids[label], levels=levels, cmap="viridis")
        ax.contour(alpha, beta, grids[label], levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="x", color="red")
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_title(label, fontsize=9)
        fig.colorbar(filled, ax=ax, label="cross-entropy", format="%.3g")
    fig.suptitle("2-D loss landscape", fontsize=10)
    return save(fig, path)


FIGURES = {
    "patch_similarity": "patch_similarity.png",
    "attention_std": "attention_std.png",
    "attention_distance": "attention_distance.png",
    "head_similarity": "head_similarity.png",
    "attention_maps": "attention_maps.png",
    "cls_dist_cosine": "cls_dist_cosine.png",
    "landscape_1d": "landscape_1d.png",
    "landscape_2d": "landscape_2d.png",
}


def plot_all(runs: Mapping[str, dict], maps: Mapping[str, torch.Tensor | None], output: Path) -> dict[str, str]:
    """Every figure that applies into ``output``; returns ``figure -> file name``."""
    output = Path(output)
    made = {
        "patch_similarity": plot_layer_curve(
            runs,
            "patch_cosine",
            "mean pairwise cosine",
            "Patch token similarity",
            output / FIGURES["patch_similarity"],
            "embedding_patch_cosine",
        ),
        "attention_std": plot_layer_curve(
            runs, "attention_std", "std of attention rows", "Attention spread", output / FIGURES["attention_std"]
        ),
        "attention_distance": plot_attention_distance(runs, output / FIGURES["attention_distance"]),
        "head_similarity": plot_layer_curve(
            runs, "head_similarity", "mean cosine between heads", "Head similarity", output / FIGURES["head_similarity"]
        ),
        "attention_maps": plot_attention_maps(maps, output / FIGURES["attention_maps"]),
        "cls_dist_cosine": plot_layer_curve(
            runs, "cls_dist_cosine", "cosine(class, distillation token)", "Class vs distillation token", output / FIGURES["cls_dist_cosine"]
        ),
        "landscape_1d": plot_landscape_1d(runs, output / FIGURES["landscape_1d"]),
        "landscape_2d": plot_landscape_2d(runs, output / FIGURES["landscape_2d"]),
    }
    return {name: path.name for name, path in made.items() if path is not None}
