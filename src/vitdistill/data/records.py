"""How a file-based split's records are stored (``data.records``), checked against the free disk
before anything is written, and opened: the one function the file-based sources (ImageFolder,
Hugging Face datasets) call with their list of images and their cache key.

- ``raw``: decoded uint8 records in one ``.npy`` (:mod:`.decoded`): no decoding per step, the
  most disk (``S * round(S * max_aspect) * 3`` bytes an image).
- ``jpeg``: JPEG records (:mod:`.jpeg`) decoded per batch into the same records: about a fifth
  to a tenth of the disk on photographs.
- ``auto``: whatever is already cached for this split; otherwise raw when the raw records are
  small (at most ``AUTO_RAW_BYTES`` and a quarter of the free disk), JPEG otherwise. The choice
  and the size are printed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from . import decoded, jpeg
from .decoded import RecordShape

AUTO_RAW_BYTES = 32 * 2**30  # raw records up to this size are worth their disk (no decoding per step)
MARGIN = 1.1  # estimates are a sample's mean: keep a tenth in hand


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (its nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(
    needed: float, folder: Path, what: str, shrink: str, key: str = "data", elsewhere: str = "point data.cache_dir at a larger disk"
) -> None:
    """Stop with one line (``key: what need ... free; shrink, or elsewhere``) when ``needed``
    bytes do not fit on the disk of ``folder``."""
    free = free_bytes(folder)
    if needed > free:
        raise UserError(f"{key}: {what} need about {_gb(needed)} in {folder}, which has {_gb(free)} free; {shrink}, or {elsewhere}")


def raw_bytes(paths: Sequence, shape: RecordShape) -> int:
    """The size of the raw records of ``paths`` (the first image's size when stored as they are)."""
    if shape.record is not None:
        rows, cols = shape.record
    else:
        try:
            with decoded.open_image(paths[0]) as img:
                cols, rows = img.size
        except Exception:  # noqa: BLE001 - a damaged first image is reported by the decode itself
            return 0
    return len(paths) * rows * cols * 3


def open_records(
    cfg: DataConfig, paths: Sequence, shape: RecordShape, array_path: Path, desc: str, names: Sequence[str] | None = None
) -> tuple[torch.Tensor | jpeg.JpegRecords, bool, torch.Tensor | None, list[str], np.ndarray | None]:
    """The split's records, made once (raw ``array_path``, or JPEG records beside it) as
    ``data.records`` says: ``(images, memory_mapped, sizes, left-out image names, contents)``
    (contents: each kept image's digest, see ``decoded.record_digest``; None for an older cache)."""
    folder = array_path.with_name(array_path.name.removesuffix(".npy") + f".jpeg{cfg.jpeg_quality}")
    kind = cfg.records
    if kind == "auto":
        kind = "raw" if array_path.is_file() else "jpeg" if folder.is_dir() else _choose(paths, shape, cfg, array_path)
    if kind == "raw":
        if not array_path.is_file():
            shrink = "set data.records=jpeg (about a fifth of the size on photographs)" + (
                " or lower data.source_size" if shape.size else ""
            )
            check_disk(raw_bytes(paths, shape), array_path.parent, "the decoded (raw) records", shrink)
            decoded.decode_files(paths, shape, array_path, desc, cfg.on_corrupt, names)
        corrupt = decoded.read_skipped(array_path)
        decoded.check_skipped(corrupt, cfg.on_corrupt)
        images, memory_mapped = decoded.load_decoded(array_path)
        return images, memory_mapped, decoded.read_sizes(array_path), corrupt, decoded.read_contents(array_path)
    if not folder.is_dir():
        estimate = jpeg.encode_sample(paths, shape, cfg.jpeg_quality) * len(paths) * MARGIN - jpeg.partial_bytes(folder)
        check_disk(estimate, folder.parent, "the JPEG records", "lower data.jpeg_quality or data.source_size")
        jpeg.build_jpeg_records(paths, shape, folder, f"{desc} (JPEG records)", cfg.on_corrupt, names, cfg.jpeg_quality)
    corrupt = jpeg.read_skipped(folder)
    decoded.check_skipped(corrupt, cfg.on_corrupt)
    records = jpeg.JpegRecords(folder, decoder_device(cfg))
    sizes = torch.from_numpy(records.true_sizes) if records.variable_size else None
    return records, True, sizes, corrupt, jpeg.read_contents(folder)


def decoder_device(cfg: DataConfig) -> str:
    """Where JPEG records are decoded: ``data.decoder``, or (``auto``) CUDA when there is a GPU."""
    if cfg.decoder == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.decoder


def _choose(paths: Sequence, shape: RecordShape, cfg: DataConfig, array_path: Path) -> str:
    """``data.records: auto`` for a split not cached yet: raw when small, JPEG otherwise (printed)."""
    raw = raw_bytes(paths, shape)
    free = free_bytes(array_path.parent)
    if raw <= AUTO_RAW_BYTES and raw <= free / 4:
        print(f"vitdistill: data.records=auto: raw records for {len(paths):,} images ({_gb(raw)})", flush=True)
        return "raw"
    estimate = jpeg.encode_sample(paths, shape, cfg.jpeg_quality) * len(paths)
    print(
        f"vitdistill: data.records=auto: JPEG records (quality {cfg.jpeg_quality}) for {len(paths):,} images "
        f"(about {_gb(estimate)}; raw records would take {_gb(raw)})",
        flush=True,
    )
    return "jpeg"
