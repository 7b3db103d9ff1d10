"""Recipe keys that name files or folders. A run, a store and label maps record them absolute,
so that `vitdistill eval`, `--resume` and `vitdistill verify` find them from any working
directory.

A teacher source's own path keys (``teacher.store``, ``teacher.checkpoint``, ...) are registered
by its class in :mod:`vitdistill.targets` (:func:`register_path_key`): the config layer imports
nothing above it."""

from __future__ import annotations

import copy
from pathlib import Path

PATH_KEYS: list[tuple[str, str]] = [
    ("data", "root"),
    ("data", "cache_dir"),
    ("model", "init"),
    ("store", "path"),
    ("labelmaps", "path"),
]


def register_path_key(section: str, key: str) -> None:
    """``section.key`` names a file or folder: make it absolute in a run's recipe."""
    if (section, key) not in PATH_KEYS:
        PATH_KEYS.append((section, key))


def absolute(value):
    """``value`` made absolute if it is a relative path (``~`` expanded); anything else as is."""
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser().resolve())
    return value


def absolute_paths_in(tree: dict) -> dict:
    """A copy of a recipe mapping (``to_dict`` form) with its path keys made absolute."""
    tree = copy.deepcopy(tree)
    for section, key in PATH_KEYS:
        part = tree.get(section)
        if isinstance(part, dict) and key in part:
            part[key] = absolute(part[key])
    return tree


def with_absolute_paths(cfg):
    """A copy of a :class:`RunConfig` with its path keys made absolute."""
    cfg = copy.deepcopy(cfg)
    for section, key in PATH_KEYS:
        part = getattr(cfg, section)
        if part is not None and hasattr(part, key):
            setattr(part, key, absolute(getattr(part, key)))
    return cfg
