"""Feature distillation over seeds: fine-tuning after feature distillation vs the same student
trained from random init for as many epochs in total.

    python benchmarks/fd_seeds.py --seeds 0 1 2 --output runs/fd_digits          # offline digits, CPU
    python benchmarks/fd_seeds.py --data .data/cifar10-jpg.tar.gz --output runs/fd_cifar10 \
        --teacher-recipe cnn_teacher_cifar10 --pretrain-recipe fd_pretrain_cifar10 \
        --finetune-recipe fd_finetune_cifar10 --analysis-images 1000   # CIFAR-10, GPU

One teacher (``--teacher-recipe``, seed 0) is trained first. Per seed: the pretrain recipe
(label-free, ``--pretrain-epochs``, default the recipe's) then the finetune recipe
(``--finetune-epochs``; layer decay, shared -> per-block relative position bias); the baseline is
the finetune recipe from random init for pretrain + finetune epochs, without layer decay
(``--baseline-layer-decay`` keeps it). Prints last-epoch top-1 mean ± std and writes
``vitdistill analyze --compare`` of the first seed's two students (attention distance per head,
head similarity, loss landscape) into ``<output>/analysis``. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from vitdistill import load_recipe
from vitdistill.analysis import analyze
from vitdistill.bench.seeds import mean_std, train_once
from vitdistill.formatting import format_table


def run(folder: Path, recipe: str, overrides: list[str]) -> dict:
    """Train unless finished; the summary and the per-epoch rows."""
    summary = train_once(folder, recipe, overrides)
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    return {**summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-recipe", default="demo_teacher")
    parser.add_argument("--pretrain-recipe", default="fd_pretrain_digits")
    parser.add_argument("--finetune-recipe", default="fd_finetune_digits")
    parser.add_argument("--data", help="data.root for every run (an ImageFolder folder or archive)")
    parser.add_argument("--pretrain-epochs", type=int, help="default: the pretrain recipe's")
    parser.add_argument("--finetune-epochs", type=int, help="default: the finetune recipe's")
    parser.add_argument("--baseline-layer-decay", action="store_true", help="the baseline keeps the fine-tuning's layer decay")
    parser.add_argument("--output", default="runs/fd_digits")
    parser.add_argument("--analysis-images", type=int, default=360, help="test images for analyze (digits has 360)")
    parser.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for the pretraining runs only, e.g. teacher.feature_layer=1",
    )
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (teacher included)")
    args = parser.parse_args()
    out = Path(args.output)
    start = time.perf_counter()
    shared = ([f"data.root={args.data}"] if args.data else []) + args.overrides
    pretrain_epochs = args.pretrain_epochs or load_recipe(args.pretrain_recipe, shared).optim.epochs
    finetune_epochs = args.finetune_epochs or load_recipe(args.finetune_recipe, shared).optim.epochs
    teacher = run(out / "teacher", args.teacher_recipe, ["seed=0", *shared])
    teacher_model = out / "teacher" / "model.safetensors"
    total = pretrain_epochs + finetune_epochs
    results = []
    for seed in args.seeds:
        common = [f"seed={seed}", *shared]
        pre = run(
            out / f"pretrain-s{seed}",
            args.pretrain_recipe,
            [*common, f"teacher.checkpoint={teacher_model}", f"optim.epochs={pretrain_epochs}", *args.pretrain_set],
        )
        fine = run(
            out / f"finetune-s{seed}",
            args.finetune_recipe,
            [*common, f"model.init={out / f'pretrain-s{seed}'}", f"optim.epochs={finetune_epochs}"],
        )
        baseline_extra = [] if args.baseline_layer_decay else ["optim.layer_decay=null"]
        base = run(out / f"baseline-s{seed}", args.finetune_recipe, [*common, "model.init=null", f"optim.epochs={total}", *baseline_extra])
        feature = [float(r["train_feature"]) for r in pre["rows"]]
        results.append(
            {
                "seed": seed,
                "fd": fine["final"]["eval_top1"],
                "baseline": base["final"]["eval_top1"],
                "feature_loss_first": feature[0],
                "feature_loss_last": feature[-1],
                "fd_wall_s": pre["wall_time_s"] + fine["wall_time_s"],
                "baseline_wall_s": base["wall_time_s"],
            }
        )
    analysis = analyze(
        out / f"finetune-s{args.seeds[0]}",
        out / "analysis",
        compare=out / f"baseline-s{args.seeds[0]}",
        images=args.analysis_images,
        landscape_images=args.analysis_images,
    )
    fd, base = [r["fd"] for r in results], [r["baseline"] for r in results]
    rows = [
        [
            f"feature distillation {pretrain_epochs} + fine-tuning {finetune_epochs} epochs",
            mean_std(fd),
            " ".join(f"{v:.2f}" for v in fd),
            f"{statistics.mean(r['fd_wall_s'] for r in results):.0f} s",
        ],
        [
            f"baseline: random init, {total} epochs" + (" (layer decay)" if args.baseline_layer_decay else ""),
            mean_std(base),
            " ".join(f"{v:.2f}" for v in base),
            f"{statistics.mean(r['baseline_wall_s'] for r in results):.0f} s",
        ],
    ]
    print(format_table(["student", "top-1 last (%)", "per seed", "train time"], rows))
    gains = " ".join(f"{r['fd'] - r['baseline']:+.2f}" for r in results)
    print(f"teacher top-1 {teacher['final']['eval_top1']:.2f}; gain per seed: {gains}")
    print(
        "feature loss first -> last epoch: " + ", ".join(f"{r['feature_loss_first']:.4f} -> {r['feature_loss_last']:.4f}" for r in results)
    )
    for model in analysis["models"]:
        distance = model["layers"]["attention_distance"]
        print(
            f"{model['label']}: mean attention distance per block {[round(sum(b) / len(b), 2) for b in distance]}, "
            f"head similarity {[round(v, 3) for v in model['layers']['head_similarity']]}"
        )
    print(f"figures in {out / 'analysis'}; {time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "teacher_top1": teacher["final"]["eval_top1"]}, indent=2))


if __name__ == "__main__":
    main()
