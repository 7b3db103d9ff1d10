"""The decode cache: images decoded once, in parallel, into one ``.npy`` array of fixed-size uint8
records in the cache folder (written through a memory map, so ImageNet-sized splits never need
to fit in RAM), read back into RAM when it takes at most half of the available memory and
memory-mapped otherwise. Every file-based source (ImageFolder, Hugging Face datasets) decodes
through it.

Variable-sized images keep their aspect (:class:`RecordShape`): short side ``data.source_size``,
long side up to ``data.max_aspect`` times that, in fixed-size zero-padded records with each
image's true size beside them, so crops can cover the whole image; same-sized images without
``data.source_size`` are kept as they are. A file that cannot be decoded is an error naming it
(``data.on_corrupt: error``) or is left out and counted (``skip``); no temporary file outlives a
failure.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import DataConfig
from ..errors import UserError
from ..progress import progress

DECODE_CHUNK = 4096  # images handed to the worker pool at once (bounds the encoded bytes held)


@dataclass(frozen=True)
class RecordShape:
    """How variable-sized images are stored: short side ``size``, long side kept up to
    ``max_aspect`` times it (centre-cropped beyond), laid along the record's width (portrait
    images are stored transposed), in a fixed ``[size, round(size * max_aspect)]`` record padded
    with zeros. None of it applies to a split whose images all have one size and no
    ``data.source_size``: those are stored as they are."""

    size: int | None
    max_aspect: float = 4 / 3

    @property
    def record(self) -> tuple[int, int] | None:
        return None if self.size is None else (self.size, round(self.size * self.max_aspect))


def resize_image(img, shape: RecordShape) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A PIL image resized as :class:`RecordShape` says, in the record's orientation and without
    padding (``[rows, cols, 3]`` uint8), and its true size ``(height, width, transposed)`` in the
    record's pixels (orientation of the image). Raw and JPEG records both start from it."""
    from PIL import Image

    img = img.convert("RGB")
    if shape.size is None:
        array = np.asarray(img, dtype=np.uint8)
        return array, (array.shape[0], array.shape[1], 0)
    size, (_, cols) = shape.size, shape.record
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    transposed = nh > nw  # portrait: the long side goes along the record's width
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        nw, nh = nh, nw
    if nw > cols:  # beyond max_aspect: keep the centre of the long side
        left = (nw - cols) // 2
        img = img.crop((left, 0, left + cols, nh))
        nw = cols
    true = (nw, nh) if transposed else (nh, nw)  # (height, width) of the image as it is seen
    return np.asarray(img, dtype=np.uint8), (true[0], true[1], int(transposed))


def open_image(path: str | bytes):
    """A PIL image from a file path or its encoded bytes."""
    from PIL import Image

    return Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)


def _decode(args: tuple[str | bytes, RecordShape]) -> tuple[np.ndarray | None, tuple[int, int, int] | None, str | None]:
    """One image (a file path or its encoded bytes) as a uint8 record, its true size
    ``(height, width, transposed)`` in the record's pixels (orientation of the image), or None and
    what went wrong. Pillow raises many exception types for damaged files -- OSError,
    SyntaxError, ValueError, DecompressionBombError -- so all are caught here and reported with
    the image's name by the caller."""
    path, shape = args
    try:
        with open_image(path) as img:
            array, true = resize_image(img, shape)
        if shape.size is None:
            return array, true, None
        record = np.zeros((*shape.record, 3), dtype=np.uint8)
        record[: array.shape[0], : array.shape[1]] = array
        return record, true, None
    except Exception as err:  # noqa: BLE001 - see the docstring
        return None, None, f"{type(err).__name__}: {err}"


def skipped_path(out: Path) -> Path:
    """The list of images a decoded array left out (beside it)."""
    return out.with_name(out.name.removesuffix(".npy") + ".skipped.json")


def sizes_path(out: Path) -> Path:
    """The true ``(height, width, transposed)`` of every record (beside it; only for
    variable-sized images)."""
    return out.with_name(out.name.removesuffix(".npy") + ".sizes.npy")


def decode_files(paths: Sequence[str | bytes], shape: RecordShape | int | None, out: Path, desc: str, on_corrupt: str = "error",
                 names: Sequence[str] | None = None) -> list[int]:
    """Decode all ``paths`` (file paths or encoded images; any sequence that slices, read
    :data:`DECODE_CHUNK` at a time) into one ``[N, H, W, 3]`` array saved (atomically) at ``out``,
    as :class:`RecordShape` describes; with a record shape the true sizes are saved beside it.

    An undecodable image is an error naming it (``names[i]``, default the path;
    ``on_corrupt='error'``) or is left out (``'skip'``: the array holds the others, in order;
    their names are recorded beside the array and their positions returned). Temporary files
    are removed on every failure.
    """
    shape = shape if isinstance(shape, RecordShape) else RecordShape(shape)
    sizes = np.zeros((len(paths), 3), dtype=np.int32)
    names = paths if names is None else names
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(len(os.sched_getaffinity(0)), 16))
    chunksize = max(1, min(len(paths), DECODE_CHUNK) // (workers * 16))
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(paths) > 256 else _Inline()

    def decoded():
        for start in range(0, len(paths), DECODE_CHUNK):
            jobs = [(p, shape) for p in paths[start : start + DECODE_CHUNK]]
            yield from pool.map(_decode, jobs, chunksize=chunksize)

    bad: list[int] = []
    array, record, kept = None, None, 0
    try:
        with atomic_path(out, f"{os.getpid()}.npy") as tmp:  # pid-tagged: two processes may decode one split at once
            for i, (img, true_size, error) in enumerate(progress(decoded(), total=len(paths), desc=desc)):
                if error is not None:
                    if on_corrupt == "error":
                        raise UserError(f"data: cannot decode {names[i]} ({error}); "
                                        "replace or delete it, or set data.on_corrupt=skip to leave it out")
                    bad.append(i)
                    continue
                if array is None:
                    record = img.shape
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *record))
                if img.shape != record:
                    raise UserError(
                        f"data: images have different sizes ({names[i]} is {img.shape[1]}x{img.shape[0]}, "
                        f"the first is {record[1]}x{record[0]}); set data.source_size to decode them with their short side at that size"
                    )
                array[kept] = img
                sizes[kept] = true_size
                kept += 1
            if array is None:
                raise UserError(f"data: none of the {len(paths):,} images could be decoded (e.g. {names[bad[0]]})")
            array.flush()
            if bad:  # keep the decoded images only: a copy into an array of the right length, put in its place
                with atomic_path(tmp) as compact:
                    final = np.lib.format.open_memmap(compact, mode="w+", dtype=np.uint8, shape=(kept, *record))
                    for first in range(0, kept, 4096):
                        final[first : first + 4096] = array[first : min(first + 4096, kept)]
                    final.flush()
                    del final
            del array
            skipped_path(out).write_text(json.dumps({"corrupt": [str(names[i]) for i in bad]}))
            if shape.size is not None:
                np.save(sizes_path(out), sizes[:kept])
    finally:
        if isinstance(pool, ProcessPoolExecutor):
            pool.shutdown(wait=True, cancel_futures=True)
    return bad


def read_skipped(array_path: Path) -> list[str]:
    """The undecodable images a cached array left out (an older cache without the list: none)."""
    path = skipped_path(array_path)
    return json.loads(path.read_text()).get("corrupt", []) if path.is_file() else []


def read_sizes(array_path: Path) -> torch.Tensor | None:
    """The records' true ``(height, width, transposed)`` ``[N, 3]`` int32, or None when the
    images are stored as they are (all one size)."""
    path = sizes_path(array_path)
    return torch.from_numpy(np.load(path)) if path.is_file() else None


def record_shape(cfg: DataConfig) -> RecordShape:
    return RecordShape(cfg.source_size, cfg.max_aspect)


def check_skipped(corrupt: list[str], on_corrupt: str) -> None:
    """A cached result with left-out images does not hide them from a run that wants all."""
    if corrupt and on_corrupt == "error":
        more = f" and {len(corrupt) - 1:,} more" if len(corrupt) > 1 else ""
        raise UserError(f"data: cannot decode {corrupt[0]}{more}; replace or delete them, or set data.on_corrupt=skip to leave them out")


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


def decode_image(item: str | bytes, shape: RecordShape) -> tuple[np.ndarray | None, tuple[int, int, int] | None, str | None]:
    """One image (a path or its encoded bytes) exactly as the decode cache stores it: the record,
    its true ``(height, width, transposed)`` and None, or ``(None, None, what went wrong)``.
    What ``vitdistill predict`` reads single files with, so its pixels are the evaluation's."""
    return _decode((item, shape))
