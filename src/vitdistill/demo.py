"""``vitdistill demo``: teacher, student, distilled student on the offline digits data (CPU)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .formatting import format_duration, format_table
from .runner import train
from .validate import load_recipe

STAGES = (  # (folder, recipe, description, distils from the stage-1 teacher)
    ("teacher", "demo_teacher", "CNN teacher", False),
    ("student", "demo_student", "DeiT student, labels only", False),
    ("distilled", "demo_student_distilled", "DeiT student, hard distillation (dist. token)", True),
)


def run_demo(output: str | Path = "runs/demo", extra_overrides: tuple[str, ...] = ()) -> dict:
    """Train the three demo runs under ``output`` and return their last-epoch accuracies."""
    output = Path(output)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    start = time.perf_counter()
    for folder, recipe, title, distils in STAGES:
        run_dir = output / folder
        if (run_dir / "checkpoint.pt").exists():  # a previous demo: start afresh
            shutil.rmtree(run_dir)
        overrides = [f"output={run_dir}", *extra_overrides]
        if distils:
            overrides.append(f"teacher.checkpoint={output / 'teacher' / 'model.safetensors'}")
        cfg = load_recipe(recipe, overrides)
        print(f"\n== {title} ({cfg.model.name}) ==")
        result = train(cfg)
        final = result.final
        results[folder] = {
            "recipe": recipe,
            "description": title,
            "model": cfg.model.name,
            "parameters": result.parameters,
            "top1": final["eval_top1"],
            "epochs": final["epoch"],
            "train_time_s": result.wall_time_s,
            "output": str(run_dir),
        }
    total = time.perf_counter() - start
    rows = [
        [r["description"], f"{r['parameters'] / 1e6:.2f}M", f"{r['top1']:.2f}", format_duration(r["train_time_s"])]
        for r in results.values()
    ]
    print(f"\nvitdistill demo: digits test split (360 images), last-epoch top-1, {format_duration(total)} in all")
    print(format_table(["model", "params", "top-1 (%)", "time"], rows))
    gain = results["distilled"]["top1"] - results["student"]["top1"]
    print(f"distillation changed the student's top-1 by {gain:+.2f} points")
    return {"runs": results, "total_time_s": total, "distillation_gain": gain}
