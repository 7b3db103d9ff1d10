"""Stand-in data for benchmarks run without a dataset: JPEGs whose decoding costs what real ones do."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_imagefolder(root: Path, count: int, classes: int = 10, sizes=(320, 500), seed: int = 0) -> Path:
    """An ImageFolder of smooth random JPEGs of ImageNet-like sizes (made once), for a benchmark
    run without a real dataset (``bench throughput``, ``benchmarks/decode_cache.py``). JPEG
    decoding cost is what matters, not content."""
    from PIL import Image

    split = root / "train"
    marker = root / f".complete-{count}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = split / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = rng.integers(sizes[0], sizes[1] + 1, size=2)
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        img = small.resize((int(w), int(h)), Image.BICUBIC)
        noise = rng.integers(-12, 13, (int(h), int(w), 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:06d}.jpg", quality=90)
    marker.touch()
    return root
