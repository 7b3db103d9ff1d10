"""ImageFolder splits (``root/<split>/<class>/<file>``), from a folder or an archive of one.

Images are decoded once, in parallel, straight into a ``.npy`` file in the cache folder (written
through a memory map, so ImageNet-sized splits never need to fit in RAM). Later runs load the
file into RAM when it takes at most half of the available memory, and memory-map it otherwise.
Variable-sized images are resized (short side) and centre-cropped to ``data.source_size`` so that
the split is one array; same-sized images are kept as they are.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from ..progress import progress
from .source import ImageSource, cache_root, hash_items, limit_positions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def unpack_archive(archive: Path, cache: Path) -> Path:
    """Unpack ``archive`` once into the cache (atomically: temp folder, then rename)."""
    stat = archive.stat()
    key = hash_items([str(archive.resolve()), str(stat.st_size), str(int(stat.st_mtime))])[:16]
    target = cache / "archives" / f"{archive.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"vitdistill: unpacking {archive} into {target}")
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    else:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python < 3.10.12
                tf.extractall(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/split``, or ``root/<single folder>/split`` (archives often wrap one folder)."""
    candidates = [root / split] + sorted(p / split for p in root.iterdir() if p.is_dir())
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError(f"data: no '{split}' folder under {root} (looked in {root}/{split} and {root}/*/{split})")


def list_split(split_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """Classes (sorted folder names), files (sorted within class) and labels."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"data: {split_dir} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += [str(p.relative_to(split_dir)) for p in found]
        labels += [label] * len(found)
    if not files:
        raise UserError(f"data: {split_dir} has no images")
    return classes, files, labels


DECODE_CHUNK = 4096  # images handed to the worker pool at once (bounds the encoded bytes held)


def _decode(args: tuple[str | bytes, int | None]) -> np.ndarray:
    """One image (a file path or its encoded bytes) as ``[H, W, 3]`` uint8, at ``size`` if given."""
    from PIL import Image

    path, size = args
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
        img = img.convert("RGB")
        if size is not None:
            w, h = img.size
            scale = size / min(w, h)
            if (w, h) != (size, size):
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def decode_files(paths: Sequence[str | bytes], size: int | None, out: Path, desc: str, names: Sequence[str] | None = None) -> None:
    """Decode all ``paths`` (file paths or encoded images; any sequence that slices, read
    :data:`DECODE_CHUNK` at a time) into one ``[N, H, W, 3]`` array saved (atomically) at ``out``.
    ``names`` name the images in errors (default: the paths)."""
    names = paths if names is None else names
    first = _decode((paths[0], size))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *first.shape))
    workers = max(1, min(len(os.sched_getaffinity(0)), 16))
    chunksize = max(1, len(paths) // (workers * 16))
    with ProcessPoolExecutor(workers) if workers > 1 and len(paths) > 256 else _Inline() as pool:

        def decoded():
            for start in range(0, len(paths), DECODE_CHUNK):
                jobs = [(p, size) for p in paths[start : start + DECODE_CHUNK]]
                yield from pool.map(_decode, jobs, chunksize=chunksize)

        for i, img in enumerate(progress(decoded(), total=len(paths), desc=desc)):
            if img.shape != first.shape:
                raise UserError(
                    f"data: images have different sizes ({names[i]} is {img.shape[1]}x{img.shape[0]}, "
                    f"{names[0]} is {first.shape[1]}x{first.shape[0]}); set data.source_size to decode them to one size"
                )
            array[i] = img
    array.flush()
    del array
    os.replace(tmp, out)


def ram_budget() -> int:
    """Bytes of decoded images we are willing to hold in RAM: half of what is available."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available // 2


def load_decoded(path: Path) -> tuple[torch.Tensor, bool]:
    """The decoded array, in RAM when it fits the budget, else memory-mapped (copy-on-write:
    writable for torch, never written back). Returns it and whether it is memory-mapped."""
    if path.stat().st_size <= ram_budget():
        return torch.from_numpy(np.load(path)), False
    return torch.from_numpy(np.load(path, mmap_mode="c")), True


class _Inline:
    """A stand-in for a process pool when the work is too small to be worth one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items, chunksize=1):
        return map(fn, items)


def open_imagefolder(cfg: DataConfig, split: str, limit: int | None) -> ImageSource:
    assert cfg.root is not None
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise UserError(f"data.root: {root} does not exist")
    cache = cache_root(cfg)
    if root.is_file():
        if not root.name.endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"data.root: {root} is a file but not a .tar, .tar.gz, .tgz or .zip archive")
        root = unpack_archive(root, cache)
    split_dir = resolve_split_dir(root, split)
    classes, files, labels = list_split(split_dir)
    keep = limit_positions(labels, limit)
    files = [files[i] for i in keep]
    labels = [labels[i] for i in keep]
    items_hash = hash_items([f"{f}\t{y}" for f, y in zip(files, labels)])
    key = hash_items([items_hash, str(cfg.source_size), str(split_dir.resolve())])[:20]
    array_path = cache / "decoded" / f"{split_dir.parent.name}-{split}-{len(files)}-{key}.npy"
    if not array_path.is_file():
        paths = [str(split_dir / f) for f in files]
        decode_files(paths, cfg.source_size, array_path, desc=f"decoding {split_dir.parent.name}/{split}")
    images, memory_mapped = load_decoded(array_path)
    return ImageSource(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        name=f"imagefolder:{split_dir.parent.name}/{split}",
        items_hash=items_hash,
        memory_mapped=memory_mapped,
    )
