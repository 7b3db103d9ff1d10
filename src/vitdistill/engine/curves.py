"""A run's training curves (``curves.png`` in the run folder, drawn at the end of training) from
its per-epoch metrics rows (the history the engine keeps, or ``metrics.csv`` read back).

``run_series(history)`` is what the figure draws: per panel, per column, the ``(epochs, values)``
of the rows (rows where a column is empty, e.g. epochs without evaluation, are left out).
Comparing several runs is :mod:`vitdistill.analysis.curves`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..figures import integer_x, pyplot, save

NOT_LOSSES = (
    "train_time_s",
    "train_img_per_s",
    "train_steps",
    "train_skipped_steps",
)  # train_ columns that are not losses (time, speed, counts)
TOP1 = re.compile(r"^(eval|ema)_top1(_\w+)?$")


def run_series(history: Sequence[Mapping[str, float]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per panel (``loss``, ``lr``, ``top1``), per column: epochs and values.

    ``loss``: the total training loss and each objective term (``train_<term>``) and the
    evaluation loss; ``lr``: the learning rate at the end of the epoch; ``top1``: evaluation top-1
    of the inference head, of each head, and of the EMA weights."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    panels: dict[str, list[str]] = {
        "loss": [c for c in columns if (c.startswith("train_") and c not in NOT_LOSSES) or c == "eval_loss" or c == "ema_loss"],
        "lr": [c for c in columns if c == "lr"],
        "top1": [c for c in columns if TOP1.match(c)],
    }
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for panel, names in panels.items():
        for name in names:
            points = [(int(row["epoch"]), float(row[name])) for row in history if isinstance(row.get(name), (int, float))]
            if points:
                epochs, values = zip(*points)
                series.setdefault(panel, {})[name] = (list(epochs), list(values))
    return series


PANEL_LABELS = {
    "loss": ("loss", "training losses (per term)"),
    "lr": ("learning rate", "learning rate"),
    "top1": ("top-1 (%)", "evaluation top-1"),
}


def plot_run_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path | None:
    """One figure, one panel per kind of curve (see :func:`run_series`); None without rows."""
    series = run_series(history)
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.6), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], series.items()):
        ylabel, panel_title = PANEL_LABELS[panel]
        for name, (epochs, values) in curves.items():
            dashed = name.startswith("ema_")
            ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=name, linestyle="--" if dashed else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        integer_x(ax)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, Path(path))


def write_run_curves(output: Path, history: Sequence[Mapping[str, float]], title: str = "") -> Path | None:
    """``curves.png`` at the end of training; a plotting failure is reported, never raised (the
    run's weights and metrics are already written)."""
    try:
        return plot_run_curves(history, Path(output) / "curves.png", title)
    except Exception as err:  # noqa: BLE001 - a figure must not fail a finished run
        print(f"vitdistill: warning: could not draw {Path(output) / 'curves.png'}: {err}")
        return None
