"""Several runs side by side, from their ``metrics.csv`` (``vitdistill compare``): ``compare_runs`` /
``format_comparison`` in one table, ``plot_comparison`` on shared axes. One run's curves
(``curves.png``, and ``run_series``: what a figure draws) are :mod:`vitdistill.engine.curves`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..engine.curves import PANEL_LABELS, run_series
from ..errors import UserError
from ..figures import integer_x, pyplot, save
from ..formatting import format_duration, format_table


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
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    names = [row["name"] for row in rows]
    table = [
        [
            row["name"] if names.count(row["name"]) == 1 else f"{row['name']} ({row['run']})",  # one recipe, several runs: their folders
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
    plt = pyplot()
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
                    ax.plot(
                        epochs,
                        values,
                        color=colour,
                        linestyle="--" if name.startswith("ema_") else "-",
                        label=label if name == names[0] else f"{label} (EMA)",
                    )
    for ax, (panel, _) in zip(axes[0], panels):
        ylabel, title = PANEL_LABELS[panel]
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title({"loss": "training loss"}.get(panel, title))
        integer_x(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save(fig, Path(path))
