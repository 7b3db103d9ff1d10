"""Decode-cache size per image and decode rate for an ImageNet-layout folder of mixed-size JPEGs.

    python benchmarks/decode_cache.py --images 2000 --source-size 256 --json decode.json

Makes (once) a folder of synthetic JPEGs of ImageNet-like sizes (sides 320-500 px, landscape and
portrait), then times ``open_source`` decoding it into a fresh cache and reports bytes per image
and images/s. Run it on two checkouts (``PYTHONPATH=<checkout>/src``) to compare versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from vitdistill.bench.synthetic import synthetic_imagefolder
from vitdistill.config import DataConfig
from vitdistill.data import open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--data", default=".cache/bench/synthetic-decode", help="where the synthetic folder is made (reused)")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = synthetic_imagefolder(Path(args.data) / f"n{args.images}", args.images, sizes=(320, 500))
    cache = Path(tempfile.mkdtemp(prefix="vitdistill-decode-"))
    try:
        began = time.perf_counter()
        source = open_source(DataConfig(root=str(root), cache_dir=str(cache), source_size=args.source_size), "train")
        seconds = time.perf_counter() - began
        array = next((cache / "decoded").glob("*.npy"))
        result = {
            "images": len(source),
            "record": list(source.image_size),
            "bytes_per_image": array.stat().st_size / len(source),
            "decode_s": seconds,
            "images_per_s": len(source) / seconds,
            "variable_sizes": getattr(source, "sizes", None) is not None,  # (older versions: no sizes)
            "cpus": len(os.sched_getaffinity(0)),
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
