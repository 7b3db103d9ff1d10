"""What offline teachers (stores, label maps) share: running the teacher to write them, and the
provenance checks that make a reader trust them (which teacher, which data, which k)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import ImageSource, open_source
from ..device import uses_bf16
from ..errors import UserError
from ..models.weights import resolve_export
from .online import OnlineTeacher, build_online_teacher


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def first_difference(stored, current, prefix: str = "") -> str | None:
    """The dotted key of the first difference between two JSON-like values, or None."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(set(stored) | set(current)):
            found = first_difference(stored.get(key), current.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    if isinstance(stored, (list, tuple)) and isinstance(current, (list, tuple)) and len(stored) == len(current):
        for i, (a, b) in enumerate(zip(stored, current)):
            found = first_difference(a, b, f"{prefix}{i}.")
            if found:
                return found
        return None
    if stored != current:
        return f"{prefix[:-1] or 'value'} ({stored!r} in the store, {current!r} now)"
    return None


def named_teacher_file(cfg: RunConfig) -> Path | None:
    """The teacher's weights file the recipe names, if any."""
    assert cfg.teacher is not None
    if cfg.teacher.checkpoint is not None:
        return resolve_export(cfg.teacher.checkpoint)
    return Path(cfg.teacher.weights) if cfg.teacher.weights is not None else None


def teacher_identity(cfg: RunConfig, teacher: OnlineTeacher) -> dict:
    """Which teacher this is: its architecture and a checksum of its weights file."""
    path = named_teacher_file(cfg)
    assert path is not None
    return {"spec": teacher.model.spec.to_json(), "weights_sha256": file_sha256(path), "path": str(path)}


def only_contents_differ(stored: dict, current: dict) -> bool:
    """The dataset fingerprints agree on names, labels, sizes and order, but not on the pixels."""
    if stored.get("contents_sha256") == current.get("contents_sha256"):
        return False
    others = [{k: v for k, v in d.items() if k != "contents_sha256"} for d in (stored, current)]
    return others[0] == others[1]


def check_provenance(where: str, dataset: dict, teacher: dict, k: int, cfg: RunConfig, source: ImageSource) -> None:
    """Offline targets answer for one dataset and one teacher: a difference is an error naming it
    (``where`` starts the message, e.g. ``teacher.store: runs/x was written for``)."""
    if only_contents_differ(dataset, source.fingerprint()):
        pinned = "other pixels" if "contents_sha256" in dataset else "images vitdistill did not pin then (written by an older version)"
        raise UserError(f"{where} other images: the same files and labels with {pinned}; write it again with the run's data")
    diff = first_difference(dataset, source.fingerprint(), "dataset.")
    if diff:
        raise UserError(f"{where} other data: {diff}")
    assert cfg.teacher is not None
    if cfg.teacher.k is not None and cfg.teacher.k != k:
        raise UserError(f"{where} k={k}, the run asks for teacher.k={cfg.teacher.k}")
    path = named_teacher_file(cfg)
    if path is not None and file_sha256(path) != teacher["weights_sha256"]:
        raise UserError(f"{where} another teacher ({teacher['path']}), not {path}")


def prepare_teacher_run(
    cfg: RunConfig, path: str | None, key: str, device: torch.device, view_size: int | None = None
) -> tuple[Path, ImageSource, OnlineTeacher, str]:
    """What writing offline targets needs: the output folder (recipe key ``key``), the training
    split, the teacher on ``device`` (checked to accept ``view_size`` inputs) and its precision."""
    if path is None:
        raise UserError(f"{key}: where should the output go? (e.g. {key}=runs/{key.split('.')[0]}/cifar10)")
    if cfg.teacher is None or (cfg.teacher.checkpoint is None and cfg.teacher.name is None):
        raise UserError("teacher: writing offline targets needs the teacher itself (teacher.checkpoint or teacher.name + weights)")
    teacher_file = named_teacher_file(cfg)  # a missing teacher is found before the data is decoded
    if teacher_file is not None and not teacher_file.is_file():
        raise UserError(f"teacher.weights: {teacher_file} does not exist")
    source = open_source(cfg.data, cfg.data.train_split, cfg.data.train_limit)
    teacher = build_online_teacher(cfg.teacher, source, cfg.data.mean, cfg.data.std, view_size).to(device)
    return Path(path), source, teacher, "bf16" if uses_bf16(device, cfg.engine.precision) else "fp32"


class CorruptManifest(UserError):
    """A manifest that is not the JSON object a writer wrote (cut short, edited by hand)."""


def repair_hint(folder: Path, command: str, rewrites: bool) -> str:
    if rewrites:
        return f"rerun `vitdistill {command}` with its recipe to write it again (or delete {folder})"
    return f"delete {folder} and write it again with `vitdistill {command}`"


def read_manifest(folder: Path, name: str, fmt: str, what: str, command: str, rewrites: bool = False) -> dict:
    """A manifest's JSON, checked to be of format ``fmt``; clear errors otherwise, a damaged one
    (:class:`CorruptManifest`) with the way to repair it (``rewrites``: ``command`` replaces a
    damaged manifest by itself)."""
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"{folder} is not {what} (no {name}); write one with `vitdistill {command}`")
    repair = repair_hint(folder, command, rewrites)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        detail = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not text"
        raise CorruptManifest(f"{path} is corrupt ({detail}); {repair}") from None
    if not isinstance(data, dict):
        raise CorruptManifest(f"{path} is corrupt (a JSON {type(data).__name__}, not an object); {repair}")
    if data.get("format") != fmt:
        raise UserError(f"{path}: unsupported format {data.get('format')!r} (this vitdistill reads {fmt})")
    return data
