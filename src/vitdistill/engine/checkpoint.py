"""Atomic checkpoints: write a temporary file, flush it to disk, then rename over the old one,
so a crash at any moment leaves either the previous checkpoint or the new one, never half."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import UserError, short_reason

CHECKPOINT_FORMAT = "vitdistill-checkpoint/1"


def save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_atomic`; a damaged or foreign file is one clear
    :class:`UserError` (not torch's ``PytorchStreamReader`` traceback)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, AttributeError) as err:
        raise UserError(f"{path} cannot be read: the file is damaged or truncated ({short_reason(err)}); restore a copy or start the run again") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a vitdistill checkpoint")
    return state
