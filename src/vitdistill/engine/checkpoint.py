"""Atomic checkpoints: write a temporary file, flush it to disk, then rename over the old one,
so a crash at any moment leaves either the previous checkpoint or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "vitdistill-checkpoint/1"


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vitdistill checkpoint")
    return state
