"""Write a file (or a folder) under a temporary name beside its target, then rename it over the
target: a reader, or a crash at any moment, sees the old version or the new one, never half.

A bottom module (nothing of vitdistill): checkpoints, metrics, stores, label maps, decode caches,
exports and benchmark reports all write through :func:`atomic_path`.

File modes are the writer's: the temporary file is created by whatever writes it (``open``,
``np.memmap``, ``torch.save``, safetensors), under its usual permissions (``open`` follows the
umask; safetensors writes 0600), and the rename keeps them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | Path, tag: str = "") -> Path:
    """The temporary name beside ``path`` that :func:`atomic_path` writes: ``<name>.tmp<tag>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{tag}")


@contextmanager
def atomic_path(path: str | Path, tag: str = "", fsync: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """The temporary path (:func:`temp_path`) to write; renamed over ``path`` when the block ends
    normally, removed (a file or a whole folder) when it raises.

    ``tag`` makes the name unique where several processes may write the same target at once
    (e.g. ``tag=str(os.getpid())``); processes that share one temporary file (ranks filling one
    store epoch) leave it empty. ``fsync`` flushes the file to disk before the rename (a
    checkpoint survives a power loss, not only a crash). ``keep_existing``: when another process
    has put ``path`` in place meanwhile (the rename of a folder onto a full one fails), theirs is
    kept and ours removed. A temporary left by an earlier crash is removed first.
    """
    path = Path(path)
    tmp = temp_path(path, tag)
    _remove(tmp)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
    finally:
        _remove(tmp)


def follow_umask(path: str | Path) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (0666 less the umask): some writers
    (safetensors) create theirs 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
