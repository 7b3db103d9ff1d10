"""Teacher store vs online teacher on CIFAR-10, and the top-k table.

For each seed: the online-teacher run (deit_tiny_distilled_cifar10) and, for each k, a store
written by the same teacher on the same views (cnn_store_cifar10) and the same student trained
from it (deit_tiny_store_cifar10). Reports last-epoch top-1 mean +- std per variant, the store
size and bytes per sample per epoch. Needs the CNN teacher (cnn_teacher_cifar10) first.

    python benchmarks/store_cifar10.py --data ../shared/datasets/cifar10-jpg.tar.gz --epochs 100 --seeds 0 1 2 --ks 1 5 10 0
    (k = 0 stores every class)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitdistill import load_recipe
from vitdistill.bench.seeds import mean_std, train_once
from vitdistill.formatting import format_table
from vitdistill.store import Manifest, write_store


def last_top1(folder: Path, recipe: str, overrides: list[str]) -> float:
    return train_once(folder, recipe, overrides)["final"]["eval_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", default="runs/cnn_teacher_cifar10/model.safetensors")
    parser.add_argument("--runs", default="runs/bench_store")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[10], help="store k values (0: all classes)")
    parser.add_argument("--json")
    args = parser.parse_args()
    runs = Path(args.runs)
    common = [f"data.root={args.data}", f"optim.epochs={args.epochs}", f"teacher.checkpoint={args.teacher}"]
    results: dict[str, list[float]] = {"online": []}
    sizes = {}
    for seed in args.seeds:
        results["online"].append(last_top1(runs / f"online-s{seed}", "deit_tiny_distilled_cifar10", [*common, f"seed={seed}"]))
        for k in args.ks:
            store = runs / f"store-k{k}-s{seed}"
            write_store(load_recipe("cnn_store_cifar10", [*common, f"seed={seed}", f"store.path={store}", f"store.k={k}"]))
            manifest = Manifest.read(store)
            size = sum((store / info["file"]).stat().st_size for info in manifest.epochs.values())
            sizes[k] = (manifest.record_bytes, size)
            top1 = last_top1(runs / f"student-k{k}-s{seed}", "deit_tiny_store_cifar10", [*common, f"seed={seed}", f"teacher.store={store}"])
            results.setdefault(f"store k={k or 'all'}", []).append(top1)
    rows = []
    for name, values in results.items():
        k = None if name == "online" else int(name.split("=")[1]) if name.split("=")[1] != "all" else 0
        record = f"{sizes[k][0]} B" if k is not None else "-"
        size = f"{sizes[k][1] / 2**20:.1f} MiB" if k is not None else "-"
        rows.append([name, mean_std(values), " ".join(f"{v:.2f}" for v in values), record, size])
    print(format_table(["teacher", "top-1 last (%)", "per seed", "bytes/sample/epoch", "store size (one seed)"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "sizes": {str(k): v for k, v in sizes.items()}}, indent=2))


if __name__ == "__main__":
    main()
