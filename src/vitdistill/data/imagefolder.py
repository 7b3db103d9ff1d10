"""ImageFolder splits (``root/<split>/<class>/<file>``), from a folder or an archive of one.

The files are listed here (classes are the sorted folder names; files, subfolders of a class folder
included as in torchvision's ``ImageFolder``, sorted by their path within a class) and
decoded once through the decode cache (:mod:`.decoded`). The cached array is keyed by the file
list, the labels and every file's size and modification time, so an edited or replaced image is
decoded again.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..config import DataConfig
from ..errors import UserError
from .decoded import DECODER_VERSION, display_name, record_shape
from .records import open_records
from .source import ImageSource, cache_root, hash_items, limit_positions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def unpacked_path(archive: Path, cache: Path) -> Path:
    """Where ``archive`` is (or will be) unpacked in the cache."""
    stat = archive.stat()
    key = hash_items([str(archive.resolve()), str(stat.st_size), str(int(stat.st_mtime))])[:16]
    return cache / "archives" / f"{archive.name.split('.')[0]}-{key}"


def unpack_archive(archive: Path, cache: Path) -> Path:
    """Unpack ``archive`` once into the cache (atomically: temp folder, then rename)."""
    target = unpacked_path(archive, cache)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"vitdistill: unpacking {archive} into {target}")
    try:
        # a pid-tagged temporary folder: another process unpacking the same archive may win the rename (theirs is kept)
        with atomic_path(target, str(os.getpid()), keep_existing=True) as tmp:
            if archive.name.endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    if hasattr(tarfile, "data_filter"):
                        tf.extractall(tmp, filter="data")
                    else:  # pragma: no cover - Python < 3.10.12
                        tf.extractall(tmp)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"data.root: {archive} is damaged or incomplete ({detail}); copy or download it again") from None
    return target


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/split``, or ``root/<single folder>/split`` (archives often wrap one folder)."""
    candidates = [root / split] + sorted(p / split for p in root.iterdir() if p.is_dir())
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError(f"data: no '{split}' folder under {root} (looked in {root}/{split} and {root}/*/{split})")


def class_files(class_dir: Path, split_dir: Path) -> tuple[list[str], list[str]]:
    """Every file under a class folder, subfolders included (as torchvision's ``ImageFolder``:
    symbolic links followed, each real folder once, so a link to an ancestor cannot loop), as
    paths relative to ``split_dir``; and the links among them that lead nowhere (dangling, or a
    loop of links), which are left out."""
    files, broken, seen = [], [], set()
    for folder, dirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: its files are listed already
            dirs[:] = []
            continue
        seen.add(real)
        for name in names:
            path = Path(folder) / name
            relative = str(path.relative_to(split_dir))
            if path.is_symlink() and not path.exists():  # dangling, or a loop of links (ELOOP)
                broken.append(relative)
            else:
                files.append(relative)
    return sorted(files), sorted(broken)


def list_split(split_dir: Path, allow_empty_classes: bool = False) -> tuple[list[str], list[str], list[int], dict[str, list[str]]]:
    """Classes (sorted folder names), image files (sorted by their path below the class folder,
    subfolders included; the class is the top folder), labels, and the files that were left
    out, by reason: ``not_image`` (by suffix) and ``broken_link``."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"data: {split_dir} has no class folders")
    files, labels = [], []
    left_out: dict[str, list[str]] = {"not_image": [], "broken_link": []}
    for label, name in enumerate(classes):
        entries, broken = class_files(split_dir / name, split_dir)
        found = [f for f in entries if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        left_out["not_image"] += [f for f in entries if Path(f).suffix.lower() not in IMAGE_SUFFIXES]
        left_out["broken_link"] += broken
        if not found and not allow_empty_classes:
            raise UserError(
                f"data: class folder {display_name(split_dir / name)} has no images; remove it, or set data.allow_empty_classes=true "
                "to keep it as a class the model can predict"
            )
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"data: {split_dir} has no images")
    return classes, files, labels, {reason: names for reason, names in left_out.items() if names}


def files_signature(split_dir: Path, files: list[str]) -> str:
    """A hash of every file's size and modification time: an edited image changes it."""
    lines = []
    for name in files:
        try:
            stat = (split_dir / name).stat()
        except OSError as err:  # vanished or became unreadable since it was listed
            raise UserError(f"data: cannot read {display_name(split_dir / name)} ({err.strerror or err})") from None
        lines.append(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hash_items(lines)


def check_root(cfg: DataConfig) -> Path:
    """``data.root``, checked to be a folder or an archive."""
    assert cfg.root is not None
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise UserError(f"data.root: {root} does not exist")
    if root.is_file() and not root.name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"data.root: {root} is a file but not a .tar, .tar.gz, .tgz or .zip archive")
    return root


def peek_imagefolder_classes(cfg: DataConfig, split: str) -> list[str] | None:
    """The split's classes from its folder names alone (no image is read), or None when that
    would mean unpacking an archive first."""
    root = check_root(cfg)
    if root.is_file():
        root = unpacked_path(root, cache_root(cfg))
        if not root.is_dir():
            return None
    classes = sorted(p.name for p in resolve_split_dir(root, split).iterdir() if p.is_dir())
    return classes or None


def open_imagefolder(cfg: DataConfig, split: str, limit: int | None) -> ImageSource:
    root = check_root(cfg)
    cache = cache_root(cfg)
    if root.is_file():
        root = unpack_archive(root, cache)
    split_dir = resolve_split_dir(root, split)
    classes, files, labels, listed_out = list_split(split_dir, cfg.allow_empty_classes)
    keep = limit_positions(labels, limit)
    files = [files[i] for i in keep]
    labels = [labels[i] for i in keep]
    listing = hash_items([f"{f}\t{y}" for f, y in zip(files, labels)])
    shape = record_shape(cfg)
    key = hash_items([listing, files_signature(split_dir, files), repr(shape), f"decoder {DECODER_VERSION}", str(split_dir.resolve())])[:20]
    array_path = cache / "decoded" / f"{split_dir.parent.name}-{split}-{len(files)}-{key}.npy"
    paths = [str(split_dir / f) for f in files]
    images, memory_mapped, sizes, corrupt, contents = open_records(
        cfg, paths, shape, array_path, f"decoding {split_dir.parent.name}/{split}"
    )
    if corrupt:
        left_out = set(corrupt)
        kept = [i for i, p in enumerate(paths) if p not in left_out]
        files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    skipped = dict(listed_out)
    if corrupt:
        skipped["corrupt"] = corrupt
    return ImageSource(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        name=f"imagefolder:{split_dir.parent.name}/{split}",
        items_hash=hash_items([f"{f}\t{y}" for f, y in zip(files, labels)]),
        memory_mapped=memory_mapped,
        skipped=skipped,
        sizes=sizes,
        contents=contents,
        names=files,
    )
