"""Accuracy, the per-epoch metrics file (CSV, optional TensorBoard) and the end-of-run summary."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..errors import RecipeWarning
from ..formatting import format_table


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels[:, None])
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def write_csv_atomic(rows: list[dict], path: Path) -> None:
    """The whole metrics table, rewritten each epoch from the run's history (crash-safe)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


class MetricsLog:
    """``metrics.csv`` in the run folder and, when tensorboard is installed, ``tb/`` events."""

    def __init__(self, output: Path, tensorboard: bool, start_epoch: int):
        self.path = output / "metrics.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: say that nothing goes to tb/
                warnings.warn(
                    "engine.tensorboard=true but tensorboard is not installed: no tb/ events are written "
                    "(pip install 'vitdistill[tensorboard]'); metrics.csv has every value",
                    RecipeWarning,
                    stacklevel=2,
                )
            else:
                self.writer = SummaryWriter(str(output / "tb"), purge_step=start_epoch + 1)

    def write(self, history: list[dict]) -> None:
        write_csv_atomic(history, self.path)
        if self.writer is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def summary_rows(history: list[dict]) -> list[tuple[str, float, float, int]]:
    """(metric, last, best, best epoch) for every accuracy column (higher is better)."""
    if not history:
        return []
    rows = []
    for key in history[-1]:
        if "top1" in key or "top5" in key:
            values = [(row[key], row["epoch"]) for row in history if isinstance(row.get(key), (int, float))]
            best, best_epoch = max(values)
            rows.append((key, history[-1][key], best, best_epoch))
    return rows


def format_summary(history: list[dict]) -> str:
    rows = [[k, f"{last:.2f}", f"{best:.2f}", str(epoch)] for k, last, best, epoch in summary_rows(history)]
    return format_table(["metric (%)", "last", "best", "best epoch"], rows)
