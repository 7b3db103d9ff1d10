"""The offline demo over several seeds: mean and std of each stage's last-epoch top-1.

python benchmarks/demo_seeds.py --seeds 0 1 2 --output runs/demo_seeds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vitdistill.bench.seeds import mean_std
from vitdistill.demo import run_demo
from vitdistill.formatting import format_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/demo_seeds")
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_demo(Path(args.output) / f"seed{seed}", (f"seed={seed}", *args.overrides))
        runs.append({"seed": seed, "wall_s": time.perf_counter() - start, **{k: v["top1"] for k, v in result["runs"].items()}})
    rows = []
    for stage in ("teacher", "student", "distilled"):
        values = [r[stage] for r in runs]
        rows.append([stage, mean_std(values), " ".join(f"{v:.2f}" for v in values)])
    gains = [r["distilled"] - r["student"] for r in runs]
    print(format_table(["stage", "top-1 mean ± std", "per seed"], rows))
    walls = " ".join(f"{r['wall_s']:.0f}s" for r in runs)
    print(f"distillation gain per seed: {' '.join(f'{g:+.2f}' for g in gains)}; wall time per demo: {walls}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
