"""Atomic checkpoints: write a temporary file, flush it to disk, then rename over the old one,
so a crash at any moment leaves either the previous checkpoint or the new one, never half."""

from __future__ import annotations

import errno
import pickle
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import UserError, short_reason

CHECKPOINT_FORMAT = "vitdistill-checkpoint/1"


# What torch.save raises when the disk fills under it: its zip writer reports the short write
# as a RuntimeError ("unexpected pos ..." / "file write failed"), not as OSError(ENOSPC).
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically; a full disk (or any write error) is one
    :class:`UserError` naming the file, with the previous checkpoint left in place."""
    try:
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise UserError(
            f"cannot write {path} ({'the disk is full' if full else short_reason(err)}); "
            f"{'free some space' if full else 'check the output folder'} and continue with --resume "
            "(the previous checkpoint is kept)"
        ) from None
    except RuntimeError as err:
        if not any(text in str(err) for text in TORCH_SHORT_WRITE):
            raise
        raise UserError(
            f"cannot write {path} (the disk is full or failing: {short_reason(err)}); free some space and continue "
            "with --resume (the previous checkpoint is kept)"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_atomic`; a damaged or foreign file is one clear
    :class:`UserError` (not torch's ``PytorchStreamReader`` traceback)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, AttributeError) as err:
        raise UserError(
            f"{path} cannot be read: the file is damaged or truncated ({short_reason(err)}); restore a copy or start the run again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a vitdistill checkpoint")
    return state
