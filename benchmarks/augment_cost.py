"""Cost of making one batch of training views: operator calls (each a kernel launch on a GPU)
and wall time, eager and compiled (``augment.compile``), with the throughput benchmark's full
augmentation (pad-and-crop, flip, RandAugment rand-m9-mstd0.5-inc1, erasing, mixup/cutmix).

    python benchmarks/augment_cost.py --size 32 --batch 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vitdistill.augment import Augmenter
from vitdistill.bench.throughput import FULL_AUGMENT
from vitdistill.config import AugmentConfig
from vitdistill.data import ImageSource
from vitdistill.device import resolve_device

VIEW_OPS = {
    "aten::view",
    "aten::slice",
    "aten::select",
    "aten::reshape",
    "aten::unsqueeze",
    "aten::expand",
    "aten::permute",
    "aten::transpose",
    "aten::flatten",
    "aten::unbind",
    "aten::squeeze",
    "aten::t",
    "aten::alias",
    "aten::as_strided",
    "aten::detach",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
}


def operator_calls(fn) -> int:
    """Top-level ATen operators that are not views or allocations."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in VIEW_OPS)


def seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    n = 4 * args.batch
    images = torch.randint(0, 256, (n, args.size, args.size, 3), dtype=torch.uint8)
    source = ImageSource(images=images, labels=torch.arange(n) % 10, classes=[str(c) for c in range(10)], name="random", items_hash="-")
    crop = {"crop": "pad", "pad": 4} if args.size <= 64 else {"crop": "rrc"}
    index = torch.arange(args.batch)
    for compiled in (False, True):
        cfg = AugmentConfig(input_size=args.size, compile=compiled, **crop, **FULL_AUGMENT)
        views = Augmenter(source, cfg, 0, (0.5,) * 3, (0.25,) * 3, device)
        start = time.perf_counter()
        views.train_batch(index, 0)  # compiles when asked
        first = time.perf_counter() - start
        calls = operator_calls(lambda views=views: views.train_batch(index, 1))
        took = seconds(lambda views=views: views.train_batch(index, 2), device, args.repeats)
        label = "compiled" if compiled else "eager"
        print(
            f"{label:8s} {args.batch} views of {args.size}x{args.size} on {device}: {took * 1000:8.1f} ms per batch, "
            f"{calls:5d} operator calls, first batch {first:.1f} s"
        )


if __name__ == "__main__":
    main()
