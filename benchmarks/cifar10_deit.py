"""CIFAR-10 DeiT benchmark: a CNN teacher trained by vitdistill, then DeiT-Ti/4 at 32x32 with and
without hard distillation through the distillation token, same epochs.

Stages run one after another (or one per call with --stage, to fit a time limit; an interrupted
stage continues with --resume semantics). Results: last-epoch top-1, wall time and images/s of
each stage, as JSON and as a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/cifar10_deit.py --data ../shared/datasets/cifar10-jpg.tar.gz
    python benchmarks/cifar10_deit.py --stage teacher ...   # then --stage baseline, --stage distilled
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vitdistill.bench.seeds import train_once
from vitdistill.formatting import format_table

STAGES = {
    "teacher": "cnn_teacher_cifar10",
    "baseline": "deit_tiny_cifar10",
    "distilled": "deit_tiny_distilled_cifar10",
}


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    out = Path(args.runs) / STAGES[stage]  # runs/cnn_teacher_cifar10 etc.: where the other recipes look
    epochs = args.teacher_epochs if stage == "teacher" else args.student_epochs
    overrides = [f"data.root={args.data}", f"optim.epochs={epochs}", f"seed={args.seed}", *args.overrides]
    if stage == "distilled":
        overrides.append(f"teacher.checkpoint={Path(args.runs) / STAGES['teacher'] / 'model.safetensors'}")
    if args.compile:
        overrides.append("engine.compile=true")
    data = train_once(out, STAGES[stage], overrides)
    final = data["final"]
    return {
        "stage": stage,
        "recipe": STAGES[stage],
        "epochs": data["epochs"],
        "top1_last": final["eval_top1"],
        "top1_cls_last": final.get("eval_top1_cls"),
        "top1_dist_last": final.get("eval_top1_dist"),
        "wall_time_s": data["wall_time_s"],
        "train_img_per_s": data["train_img_per_s"],
        "command": "vitdistill train " + STAGES[stage] + " " + " ".join([f"output={out}", *overrides]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder folder or archive")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--stage", choices=["all", *STAGES], default="all")
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = parser.parse_args()
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    results = [run_stage(stage, args) for stage in stages]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"device": device, "torch": torch.__version__, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    rows = [
        [r["stage"], str(r["epochs"]), f"{r['top1_last']:.2f}", f"{r['wall_time_s'] / 60:.1f} min", f"{r['train_img_per_s']:,.0f}"]
        for r in results
    ]
    print(f"\n{device}, torch {torch.__version__}")
    print(format_table(["stage", "epochs", "top-1 last (%)", "wall time", "train img/s"], rows))


if __name__ == "__main__":
    main()
