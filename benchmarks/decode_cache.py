"""Raw vs JPEG records on real photographs: bytes per image, build rate, decode rate per core, and
the training img/s of a small ViT at 224 on the CPU from each; the disk for ImageNet-1k/21k.

    python benchmarks/decode_cache.py --images 2000 --source-size 256 --json decode.json

Makes (once) an ImageNet-layout folder of distinct photographs of ImageNet sizes (sides about
375-500 px, landscape and portrait, saved as JPEG at quality 90 like the originals): random
crops, scales and flips of scikit-learn's two sample photographs -- not synthetic noise or flat
colours, whose JPEG sizes are nothing like a photo's. Then, each in a fresh cache:

- build: ``open_source`` writing raw records, then JPEG records (all cores), images/s;
- decode per core: one thread decoding the original files the first time (what raw records cost
  once) vs one thread decoding JPEG records into padded records (what every step costs);
- train: ``--train-steps`` steps of DeiT-Ti/16 at 224 (batch ``--batch``) on the CPU, views made
  from each kind of records (JPEG decoded by threads ahead of the step; raw gathered ahead by
  threads, as memory-mapped raw records are, and read in place from RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vitdistill.bench.photos import IMAGENET, photo_folder, train_rate
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.data.decoded import RecordShape, _decode


def decode_originals_per_core(paths: list[str], shape: RecordShape) -> float:
    began = time.perf_counter()
    for p in paths:
        _decode((p, shape))
    return len(paths) / (time.perf_counter() - began)


def decode_records_per_core(records, count: int, batch: int = 64) -> float:
    records.threads = 1
    records._pool = None
    began = time.perf_counter()
    for s in range(0, count, batch):
        records.decode_cpu(torch.arange(s, min(s + batch, count)))
    return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--per-core", type=int, default=300, help="images decoded by one thread for the per-core rates")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--data", default=".cache/bench/photos-decode", help="where the photographs are made (reused)")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = photo_folder(Path(args.data) / f"n{args.images}", args.images)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cache = Path(tempfile.mkdtemp(prefix="vitdistill-decode-"))
    result: dict = {"images": args.images, "source_size": args.source_size, "quality": args.quality, "cpus": len(os.sched_getaffinity(0))}
    try:
        sources = {}
        for kind in ("raw", "jpeg"):
            cfg = DataConfig(
                root=str(root),
                cache_dir=str(cache / kind),
                source_size=args.source_size,
                records=kind,
                jpeg_quality=args.quality,
                decoder="cpu",
                eval_split="train",
            )
            began = time.perf_counter()
            sources[kind] = open_source(cfg, "train")
            seconds = time.perf_counter() - began
            files = [p for p in (cache / kind / "decoded").rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            result[kind] = {"bytes_per_image": size / args.images, "build_s": seconds, "build_images_per_s": args.images / seconds}
        result["record"] = list(sources["raw"].image_size)
        paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))[: args.per_core]
        shape = RecordShape(args.source_size)
        result["raw"]["decode_per_core"] = decode_originals_per_core(paths, shape)  # first-time decode of the originals
        result["jpeg"]["decode_per_core"] = decode_records_per_core(sources["jpeg"].images, min(args.per_core, args.images))
        cpu = torch.device("cpu")
        result["jpeg"]["train_images_per_s"] = train_rate(sources["jpeg"], cpu, args.train_steps, args.batch, workers=2)
        result["raw"]["train_images_per_s"] = train_rate(sources["raw"], cpu, args.train_steps, args.batch, workers=2, placement="host")
        # raw records held in RAM and read in place (data.placement: auto on the CPU for small data)
        result["raw"]["train_images_per_s_in_place"] = train_rate(sources["raw"], cpu, args.train_steps, args.batch, workers=2)
        ratio = result["jpeg"]["bytes_per_image"] / result["raw"]["bytes_per_image"]
        result["jpeg_over_raw_bytes"] = ratio
        result["extrapolated_gb"] = {
            name: {k: n * result[k]["bytes_per_image"] / 1e9 for k in ("raw", "jpeg")} for name, n in IMAGENET.items()
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
