"""One run per output folder: a lock file (``<folder>/.vitdistill.lock``: host and pid) created
exclusively, removed on exit. A second run into the same folder stops with one line naming the
holder; a lock left by a process that died (same host, pid gone: ``kill -9``, an elastic restart)
is taken over.

A bottom module: nothing of vitdistill but the errors. Plain files (no ``flock``) so the lock is
seen across the nodes of a shared filesystem too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".vitdistill.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> tuple[str, int] | None:
    """(host, pid) written in the lock, or None when it is unreadable (being written, or gone)."""
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _try_create(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


@contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder``'s lock inside the block (the folder is created, and removed again if it is
    still empty at the end); raise :class:`UserError`
    naming the other process when a live one holds it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    host, pid = socket.gethostname(), os.getpid()
    mine = f"{host} {pid}\n"
    for _ in range(3):
        if _try_create(path, mine):
            break
        holder = _holder(path)
        if holder is None or (holder[0] == host and (holder[1] == pid or not _alive(holder[1]))):
            # stale (its process died) or half-written: move it aside under a unique name, so that
            # of two processes taking it over at once only one removes the lock file
            aside = path.with_name(f"{LOCK_NAME}.stale{pid}")
            try:
                os.replace(path, aside)
                aside.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        other_host, other_pid = holder
        where = f"process {other_pid}" if other_host == host else f"process {other_pid} on {other_host}"
        raise UserError(
            f"{folder} is in use by another {what} ({where}); wait for it to end, stop it, or choose another output folder "
            f"(remove {path} if that process is gone)"
        )
    else:
        raise UserError(f"{folder}: could not take the lock {path} (another process keeps replacing it)")
    try:
        yield path
    finally:
        if _holder(path) == (host, pid):
            path.unlink(missing_ok=True)
        if created:  # a run refused before writing anything leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                pass
