"""A run's training curves and a side-by-side of several runs, from their ``metrics.csv``.

``run_series(history)`` is what a figure draws: per panel, per column, the ``(epochs, values)``
of ``metrics.csv`` (rows where a column is empty, e.g. epochs without evaluation, are left out).
``plot_run_curves`` draws one run (``curves.png`` in the run folder, written at the end of
training); ``compare_runs`` / ``plot_comparison`` put several runs in one table and on shared
axes (``vitdistill compare``). matplotlib is imported lazily (Agg) by :mod:`.plots`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import UserError
from .plots import _integer_x, _pyplot, _save

NOT_LOSSES = ("train_time_s", "train_img_per_s")
TOP1 = re.compile(r"^(eval|ema)_top1(_\w+)?$")


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """``metrics.csv`` of a run folder as rows of numbers (empty cells left out)."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        raise UserError(f"{path} does not exist (not a vitdistill run folder, or no epoch finished yet)")
    with path.open(newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    if not rows:
        raise UserError(f"{path} has no rows yet")
    return rows


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


PANEL_LABELS = {"loss": ("loss", "training losses (per term)"), "lr": ("learning rate", "learning rate"), "top1": ("top-1 (%)", "evaluation top-1")}


def plot_run_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path | None:
    """One figure, one panel per kind of curve (see :func:`run_series`); None without rows."""
    series = run_series(history)
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.6), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], series.items()):
        ylabel, panel_title = PANEL_LABELS[panel]
        for name, (epochs, values) in curves.items():
            ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=name, linestyle="--" if name.startswith("ema_") else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        _integer_x(ax)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def write_run_curves(output: Path, history: Sequence[Mapping[str, float]], title: str = "") -> Path | None:
    """``curves.png`` at the end of training; a plotting failure is reported, never raised (the
    run's weights and metrics are already written)."""
    try:
        return plot_run_curves(history, Path(output) / "curves.png", title)
    except Exception as err:  # noqa: BLE001 - a figure must not fail a finished run
        print(f"vitdistill: warning: could not draw {Path(output) / 'curves.png'}: {err}")
        return None


# ---------------------------------------------------------------------------- several runs
def _parameters(run: Path) -> int | None:
    """Parameters of the run's exported model, counted on the meta device (nothing allocated)."""
    import torch

    from ..models import ModelSpec, VisionModel, read_spec
    from ..models.network import create_backbone

    weights = run / "model.safetensors"
    if not weights.is_file():
        return None
    spec: ModelSpec = read_spec(weights)
    with torch.device("meta"):
        model = VisionModel(create_backbone(spec), spec)
    return sum(p.numel() for p in model.parameters())


def run_summary(run: str | Path) -> dict:
    """One row of the comparison: final and best top-1, EMA top-1, parameters, time, speed."""
    run = Path(run)
    history = read_metrics(run)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    evaluated = [row for row in history if "eval_top1" in row]
    best = max(evaluated, key=lambda row: row["eval_top1"]) if evaluated else None
    ema = [row["ema_top1"] for row in history if "ema_top1" in row]
    rates = [row["train_img_per_s"] for row in history if "train_img_per_s" in row]
    model = None
    recipe = run / "config.yaml"
    if recipe.is_file():
        import yaml

        model = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("name")
    return {
        "run": str(run),
        "name": summary.get("name", run.name),
        "model": model,
        "parameters": _parameters(run),
        "epochs": int(history[-1]["epoch"]),
        "final_top1": evaluated[-1]["eval_top1"] if evaluated else None,
        "best_top1": best["eval_top1"] if best else None,
        "best_epoch": int(best["epoch"]) if best else None,
        "final_ema_top1": ema[-1] if ema else None,
        # the whole run as timed by the runner, else the sum of the epochs' training time
        "wall_time_s": summary.get("wall_time_s", sum(row.get("train_time_s", 0.0) for row in history)),
        "train_img_per_s": summary.get("train_img_per_s") or (sum(rates) / len(rates) if rates else None),
    }


def compare_runs(runs: Sequence[str | Path]) -> list[dict]:
    if not runs:
        raise UserError("compare: give at least one run folder")
    return [run_summary(run) for run in runs]


def format_comparison(rows: Sequence[dict]) -> str:
    from ..formatting import format_duration, format_table

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = [
        [
            row["name"],
            row["model"] or "-",
            "-" if row["parameters"] is None else f"{row['parameters'] / 1e6:.2f}M",
            str(row["epochs"]),
            num(row["final_top1"], ".2f"),
            "-" if row["best_top1"] is None else f"{row['best_top1']:.2f} ({row['best_epoch']})",
            num(row["final_ema_top1"], ".2f"),
            format_duration(row["wall_time_s"]),
            num(row["train_img_per_s"], ",.0f"),
        ]
        for row in rows
    ]
    headers = ["run", "model", "params", "epochs", "top-1 last", "top-1 best (epoch)", "EMA last", "wall time", "img/s"]
    return format_table(headers, table)


def plot_comparison(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """The runs on shared axes: training loss, evaluation top-1 (EMA dashed) and lr per epoch."""
    plt = _pyplot()
    panels = [("loss", ["train_loss"]), ("top1", ["eval_top1", "ema_top1"]), ("lr", ["lr"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(histories.items()):
        series = run_series(history)
        colour = colours[i % len(colours)]
        for ax, (panel, names) in zip(axes[0], panels):
            for name in names:
                if name in series.get(panel, {}):
                    epochs, values = series[panel][name]
                    ax.plot(epochs, values, color=colour, linestyle="--" if name.startswith("ema_") else "-", label=label if name == names[0] else f"{label} (EMA)")
    for ax, (panel, _) in zip(axes[0], panels):
        ylabel, title = PANEL_LABELS[panel]
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title({"loss": "training loss"}.get(panel, title))
        _integer_x(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, Path(path))
