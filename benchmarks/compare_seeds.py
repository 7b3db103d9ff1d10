"""Train recipe variants over several seeds; report last-epoch top-1 mean +- std per variant and,
with --analyze, the last-layer patch cosine similarity (and the analyze report of seed 0).

    # token labeling (issue 5), after `vitdistill labelmaps cnn_labelmaps_cifar10 ...`
    python benchmarks/compare_seeds.py --data ../shared/datasets/cifar10-jpg.tar.gz --epochs 100 \\
        --variant baseline deit_tiny_cifar10 --variant token_label deit_tiny_token_label_cifar10
    # patch diversity (issue 6)
    python benchmarks/compare_seeds.py ... --analyze \\
        --variant baseline deit_tiny_cifar10 --variant diverse deit_tiny_diverse_cifar10
    # GPU vs CPU augmentation, same recipe (issue 3)
    python benchmarks/compare_seeds.py ... --variant gpu_views deit_tiny_cifar10 \\
        --variant cpu_views deit_tiny_cifar10 data.augment_device=cpu

A variant is ``LABEL RECIPE [key=value ...]``. Finished runs are reused (an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vitdistill.bench import seeds
from vitdistill.formatting import format_table


def mean_std(values: list[float]) -> str:
    return seeds.mean_std(values, 3 if max(values) <= 1 else 2)  # cosines in [0, 1] get a third digit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="LABEL RECIPE [key=value]")
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/compare")
    parser.add_argument("--analyze", action="store_true", help="also measure patch similarity; report of seed 0")
    parser.add_argument("--analysis-images", type=int, default=1000)
    parser.add_argument("--json")
    args = parser.parse_args()
    common = [f"data.root={args.data}"] + ([f"optim.epochs={args.epochs}"] if args.epochs else [])
    results = {}
    for label, recipe, *extra in args.variant:
        rows = []
        for seed in args.seeds:
            folder = Path(args.runs) / f"{label}-s{seed}"
            summary = seeds.train_once(folder, recipe, [*common, f"seed={seed}", *extra])
            row = {
                "seed": seed,
                "top1": summary["final"]["eval_top1"],
                "wall_time_s": summary["wall_time_s"],
                "img_s": summary["train_img_per_s"],
            }
            if args.analyze:
                from vitdistill.analysis import analyze

                report = analyze(
                    folder, Path(args.runs) / f"analysis-{label}-s{seed}", images=args.analysis_images, landscape_images=0 if seed else 256
                )
                row["last_patch_cosine"] = report["models"][0]["layers"]["patch_cosine"][-1]
            rows.append(row)
        results[label] = {"recipe": recipe, "overrides": extra, "runs": rows}
    if args.analyze and len(results) >= 2:
        from vitdistill.analysis import analyze

        first, second = list(results)[:2]
        analyze(
            Path(args.runs) / f"{first}-s{args.seeds[0]}",
            Path(args.runs) / "analysis-compare",
            compare=Path(args.runs) / f"{second}-s{args.seeds[0]}",
        )
    table = []
    for label, result in results.items():
        runs = result["runs"]
        line = [
            label,
            result["recipe"] + "".join(f" {o}" for o in result["overrides"]),
            mean_std([r["top1"] for r in runs]),
            " ".join(f"{r['top1']:.2f}" for r in runs),
            f"{statistics.mean(r['img_s'] for r in runs):,.0f}",
        ]
        if args.analyze:
            line.append(mean_std([r["last_patch_cosine"] for r in runs]))
        table.append(line)
    headers = ["variant", "recipe", "top-1 last (%)", "per seed", "train img/s"] + (["last-layer patch cos"] if args.analyze else [])
    print(format_table(headers, table))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
