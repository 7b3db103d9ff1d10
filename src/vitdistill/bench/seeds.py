"""What the experiment scripts in benchmarks/ share: runs that survive an interruption, and the
mean ± std of a figure over seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..runner import train
from ..validate import load_recipe


def train_once(folder: Path, recipe: str, overrides: list[str]) -> dict:
    """The run's ``summary.json``, training ``recipe`` into ``folder`` first unless it finished
    (a run interrupted before continues from its checkpoint)."""
    summary = folder / "summary.json"
    if not summary.is_file():
        train(load_recipe(recipe, [f"output={folder}", *overrides]), resume=(folder / "checkpoint.pt").is_file())
    return json.loads(summary.read_text())


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` (the sample standard deviation; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"
