"""A big file filled chunk by chunk that an interrupted run continues instead of redoing.

The file is filled at ``<target>.partial`` (a pre-sized memory map); each process notes how many
of its chunks are written and flushed in ``<target>.partial.<rank>of<world>`` (with a ``key``: the
chunk size and anything else that fixes what a chunk holds). A run that finds the partial file
and its own note skips those chunks; when every chunk is written the partial file is renamed
over the target and the notes removed. Chunks are recomputed from the same inputs in the same
composition, so a resumed file is byte for byte the uninterrupted one.

Used by ``vitdistill cache`` (one file per epoch) and ``vitdistill labelmaps``. A bottom module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .atomic import write_text_atomic

SAVE_EVERY_S = 30.0  # how often a note is brought up to date while filling (and on every exit)


def partial_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.partial")


def note_path(target: Path, rank: int, world: int) -> Path:
    return target.with_name(f"{target.name}.partial.{rank}of{world}")


def notes(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f"{target.name}.partial.*of*"))


def chunks_done(target: Path, key: str, rank: int = 0, world: int = 1) -> int:
    """Chunks of this process already in the partial file (0 without a matching note)."""
    note = note_path(target, rank, world)
    if not partial_path(target).is_file() or not note.is_file():
        return 0
    saved_key, _, count = note.read_text().rpartition(" ")
    return int(count) if saved_key == key and count.isdigit() else 0


def discard(target: Path) -> None:
    """Forget any partial fill of ``target`` (a new one starts)."""
    partial_path(target).unlink(missing_ok=True)
    for note in notes(target):
        note.unlink(missing_ok=True)


class Progress:
    """This process's note, written after :meth:`flush` (the caller's memory map) succeeded:
    every :data:`SAVE_EVERY_S` seconds, and when the block ends for any reason."""

    def __init__(self, target: Path, key: str, flush, rank: int = 0, world: int = 1, done: int = 0):
        self.note, self.key, self.flush = note_path(target, rank, world), key, flush
        self.done, self.saved_at = done, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if time.perf_counter() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        self.flush()
        write_text_atomic(self.note, f"{self.key} {self.done}")
        self.saved_at = time.perf_counter()


def finish(target: Path) -> None:
    """Every chunk is written: the partial file becomes ``target``; the notes go."""
    partial = partial_path(target)
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)
    for note in notes(target):
        note.unlink(missing_ok=True)
