"""Weight files: reading state dicts (safetensors or torch files), loading them into a model, and
exports.

An exported model is a ``.safetensors`` file holding the timm model's own state dict (so timm
users can load it directly) and, in its metadata, a :class:`~vitdistill.models.spec.ModelSpec`:
everything needed to rebuild it (architecture, class names, input size, normalisation).
"""

from __future__ import annotations

import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..atomic import atomic_path, follow_umask
from ..errors import UserError, short_reason
from .relpos import per_block_rel_pos_bias
from .spec import ModelSpec


class Weighted(Protocol):
    """What weight files are read into and written from (the wrapper, :class:`~.network.VisionModel`):
    a timm backbone, our extra weights beside it (e.g. a token head), and the spec that rebuilds it."""

    backbone: nn.Module
    spec: ModelSpec

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None: ...


SPEC_KEY = "vitdistill"
EXTRA_PREFIX = "_vitdistill."  # keys of weights that are not the timm model's (e.g. our token head)


@contextmanager
def damaged_file_errors(path: Path):
    """A weights file that cannot be parsed (truncated, overwritten) is one :class:`UserError`."""
    try:
        yield
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} cannot be read: the file is damaged or truncated ({short_reason(err)})") from None


def unwrap_state_dict(state: Any) -> dict[str, Any] | None:
    """The weights inside a loaded torch file: ``state_dict``/``model`` entries (training
    checkpoints) are unwrapped and ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes
    removed. None when it holds no state dict."""
    for entry in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(entry), dict):
            state = state[entry]
    if not isinstance(state, dict):
        return None
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``state_dict``/``model`` entries and
    ``module.`` prefixes are unwrapped). ``key`` names the recipe key in errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    if path.suffix == ".safetensors":
        with damaged_file_errors(path):
            state = load_file(str(path))
    else:
        with damaged_file_errors(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
    state = unwrap_state_dict(state)
    if state is None:
        raise UserError(f"{key}: {path} does not hold a state dict")
    return state


def load_weights(model: Weighted, path: str | Path, key: str) -> None:
    """Weights for a model (an export, run folder or plain state dict). The classifier may have
    another class count (finetuning on other classes): it is then left freshly initialised."""
    state = read_state_dict(path, key)
    model.load_extra_state(state)
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    own = model.backbone.state_dict()
    state = per_block_rel_pos_bias(state, own, key)
    classifier = {n for n, _ in model.backbone.named_parameters() if n.startswith(classifier_prefixes(model.backbone))}
    skipped = [k for k in state if k in classifier and k in own and state[k].shape != own[k].shape]
    if skipped:
        print(f"vitdistill: {key}: {path} has another class count; the classifier ({', '.join(skipped)}) starts fresh")
    load_backbone_weights(model.backbone, {k: v for k, v in state.items() if k not in skipped}, key, missing_ok=set(skipped))


def classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Prefixes of the classification heads' parameter names."""
    names = []
    for attr in ("head", "head_dist", "fc", "classifier", "aux_head"):
        if isinstance(getattr(backbone, attr, None), nn.Module):
            names.append(f"{attr}.")
    return tuple(names) or ("head.",)


def load_backbone_weights(backbone: nn.Module, path: str | Path | dict, key: str, missing_ok: set[str] = frozenset()) -> None:
    state = read_state_dict(path, key) if not isinstance(path, dict) else path
    source = "the state dict" if isinstance(path, dict) else path  # what the errors name
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. another class count
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise UserError(f"{key}: {source} does not fit the model ({detail})") from None
    missing = [k for k in result.missing_keys if k not in missing_ok]
    if missing or result.unexpected_keys:
        missing, unexpected = missing[:3], result.unexpected_keys[:3]
        raise UserError(f"{key}: {source} does not fit the model (missing {missing}, unexpected {unexpected})")


def export_model(model: Weighted, path: str | Path) -> None:
    """Write the backbone's weights and the spec to ``path`` (atomic: temp file + rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in {**model.backbone.state_dict(), **model.extra_state()}.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={SPEC_KEY: model.spec.to_json()})
        follow_umask(tmp)  # safetensors writes 0600; other run files follow the umask


def read_spec(path: str | Path) -> ModelSpec:
    with damaged_file_errors(path), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SPEC_KEY not in meta:
        raise UserError(f"{path} is not a vitdistill export (no model spec in its metadata); use teacher.name + teacher.weights")
    return ModelSpec.from_json(meta[SPEC_KEY])


def resolve_export(path: str | Path) -> Path:
    """A run folder or an export file -> the export file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected a model.safetensors written by vitdistill, or its run folder)")
    return path
